"""Issue 17, data side: corrupt or unfit stores never train or replay silently; one line each.

Item 3 (corrupt values, wrong dtype, the published manifest), item 5 (what a store can train),
item 7 (zarr's asyncio tracebacks), item 10 (sharded zarr 3 stores; `dp sim replay` on the checked
reader). The severe items run end to end through `dp ...` (`diffusion_policy.cli.main.main`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from diffusion_policy.cli.main import main
from diffusion_policy.data.fetch import make_manifest
from diffusion_policy.data.replay_buffer import ReplayBuffer, validate
from diffusion_policy.errors import DataError

LENGTHS = (30, 25, 40, 35, 30)
REPO = Path(__file__).resolve().parents[1]


def pusht_episodes(keys=("action", "state", "keypoint")) -> list[dict[str, np.ndarray]]:
    """Plausible low-dim Push-T episodes (px values, raw angles); no images, so they stay tiny."""
    rng = np.random.default_rng(0)
    out = []
    for n in LENGTHS:
        state = rng.uniform(50, 450, (n, 5)).astype(np.float32)
        state[:, 4] = rng.uniform(-3, 3, n)
        ep = {
            "action": rng.uniform(50, 450, (n, 2)).astype(np.float32),
            "state": state,
            "keypoint": rng.uniform(50, 450, (n, 9, 2)).astype(np.float32),
        }
        out.append({k: ep[k] for k in keys})
    return out


def save_store(path: Path, zarr_format: int = 2, keys=("action", "state", "keypoint")) -> Path:
    buf = ReplayBuffer.create_empty()
    for ep in pusht_episodes(keys):
        buf.add_episode(ep)
    return buf.save(path, zarr_format=zarr_format)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def assert_refused(store: Path, capsys, validate_says: str, train_says: str) -> None:
    """`dp data validate` reports it (exit 1) and `dp train` stops at loading with one line (exit 2)."""
    assert main(["data", "validate", str(store)]) == 1
    assert validate_says in capsys.readouterr().out
    run = store.parent / "run"
    assert main(["train", "smoke", f"task.dataset={store}", f"run_dir={run}"]) == 2
    assert train_says in one_line_error(capsys)


# ---------------------------------------------------------------- item 3: corrupt data never trains
def test_flipped_byte_in_a_v2_chunk_is_caught_by_validate_and_training(tmp_path, capsys):
    """One flipped byte turns action 300.0 into 2.4e35 and decodes without error (v2 has no checksum)."""
    store = save_store(tmp_path / "flip.zarr")
    g = zarr.open_group(str(store), mode="a")
    values = g["data/action"][:]
    values[6, 0] = 300.0
    del g["data/action"]  # rewritten uncompressed, so the bytes on disk are the values themselves
    g.create_array("data/action", shape=values.shape, dtype="<f4", compressors=None, fill_value=0)
    g["data/action"][:] = values
    action = store / "data" / "action"
    raw = bytearray((action / "0.0").read_bytes())
    raw[6 * 8 + 3] ^= 0x39  # the exponent byte of action[6, 0]: 0x43 -> 0x7A
    (action / "0.0").write_bytes(bytes(raw))
    assert zarr.open_array(str(action), mode="r")[6, 0] > 1e35  # decodes silently

    assert_refused(store, capsys, "e+35 at frame 6", "data/action: 1 value(s) beyond ±1e+06")


def test_int_dtype_over_float_bytes_is_caught_by_validate_and_training(tmp_path, capsys):
    """`.zarray` says <i4 over float32 bytes: the values read as about 1.1e9."""
    store = save_store(tmp_path / "dtype.zarr")
    zarray = store / "data" / "action" / ".zarray"
    meta = json.loads(zarray.read_text())
    zarray.write_text(json.dumps({**meta, "dtype": "<i4"}))
    assert_refused(
        store, capsys, "data/action: 320 value(s) beyond", "dtype int32 but Push-T action"
    )


def test_plausible_but_wrong_dtype_is_caught_by_the_format(tmp_path, capsys):
    """Small integer actions pass the magnitude checks; the Push-T format still wants floats."""
    path = tmp_path / "ints.zarr"
    buf = ReplayBuffer.create_empty()
    for ep in pusht_episodes():
        buf.add_episode({**ep, "action": ep["action"].astype(np.int32)})
    buf.save(path)
    assert_refused(path, capsys, "data/action: dtype int32 but Push-T action", "dtype int32")


def test_one_outlier_among_small_values_is_caught():
    """Values in metres: 5000 is below the absolute bound but 1000 robust ranges off."""
    buf = ReplayBuffer.create_empty()
    x = np.random.default_rng(0).uniform(0.0, 0.5, (200, 3)).astype(np.float32)
    x[77, 1] = 5000.0
    buf.add_episode({"pos": x})
    with pytest.raises(
        DataError, match=r"data/pos: 1 implausible value\(s\), first 5e\+03 at frame 77"
    ):
        buf.read("pos")
    buf.read("pos", slice(0, 50))  # a part is only checked for NaN/Inf and magnitude


def test_validate_verifies_a_known_store_against_its_manifest(tmp_path, capsys):
    """A store named like a published one must match the shipped manifest (a plausible changed value)."""
    store = save_store(tmp_path / "pusht" / "pusht_cchi_v7_replay.zarr")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(make_manifest(store, "tiny", "http://127.0.0.1:9/x.zip", "p")))
    argv = ["data", "validate", str(store), "--manifest", str(manifest)]
    assert main(argv) == 0
    assert "manifest  matches the published dataset 'tiny'" in capsys.readouterr().out
    zarr.open_array(str(store / "data" / "action"), mode="a")[3, 1] += 1.0
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "data/action: sha256" in out and "differs from the published dataset 'tiny'" in out


@pytest.mark.real_data
def test_validate_recognises_the_real_store(pusht_zarr, capsys):
    assert main(["data", "validate", str(pusht_zarr)]) == 0
    out = capsys.readouterr().out
    assert "matches the published dataset 'pusht'" in out
    assert "trains    Push-T obs types: state, keypoints, pixels_agent_pos" in out


# ---------------------------------------------------------------- item 5: what the store can train
def test_validate_says_what_a_store_cannot_train(tmp_path, capsys):
    no_action = save_store(tmp_path / "no_action.zarr", keys=("state", "keypoint"))
    assert main(["data", "validate", str(no_action)]) == 1
    out = capsys.readouterr().out
    assert "cannot train any Push-T obs type (" in out and "missing key data/action" in out

    no_kp = save_store(tmp_path / "no_kp.zarr", keys=("action", "state"))
    assert main(["data", "validate", str(no_kp)]) == 0
    out = capsys.readouterr().out
    assert "trains    Push-T obs types: state\n" in out
    assert "cannot    keypoints:" in out and "missing key data/keypoint" in out
    assert main(["data", "validate", str(no_kp), "--obs-type", "keypoints"]) == 1
    assert "cannot train Push-T obs_type keypoints" in capsys.readouterr().out
    assert main(["data", "validate", str(no_kp), "--obs-type", "state"]) == 0
    assert main(["data", "validate", str(no_action), "--task", "none"]) == 0  # the store is sound
    assert main(["data", "validate", str(no_kp), "--obs-type", "image"]) == 2
    assert "unknown Push-T obs_type 'image'" in one_line_error(capsys)


# ---------------------------------------------------------------- item 7: one line, no asyncio noise
def test_unparseable_dtype_is_one_line_per_key_without_asyncio_tracebacks(tmp_path):
    store = save_store(tmp_path / "f3.zarr")
    for k in ("extra1", "extra2", "extra3"):
        zarr.open_group(str(store), mode="a").create_array(f"data/{k}", shape=(160,), dtype="f4")
    for k in ("action", "keypoint", "extra1", "extra2", "extra3"):
        zarray = store / "data" / k / ".zarray"
        zarray.write_text(json.dumps({**json.loads(zarray.read_text()), "dtype": "<f3"}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "diffusion_policy.cli", "data", "validate", str(store)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Task exception" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "unreadable metadata" in ln]
    assert len(lines) == 5 and "data/action: unreadable metadata" in lines[0] and "<f3" in lines[0]
    with pytest.raises(DataError, match="data/action: unreadable metadata"):
        ReplayBuffer.load(store)


# ---------------------------------------------------------------- item 10: shards; replay reads checked
def sharded_store(path: Path) -> Path:
    """A zarr 3 store with the sharding codec: 4 chunks of 10 frames per shard file."""
    g = zarr.open_group(str(path), mode="w-", zarr_format=3)
    eps = pusht_episodes(("action", "state"))
    for k in ("action", "state"):
        x = np.concatenate([ep[k] for ep in eps])
        a = g.create_array(
            f"data/{k}",
            shape=x.shape,
            dtype=x.dtype,
            chunks=(10, x.shape[1]),
            shards=(40, x.shape[1]),
        )
        a[:] = x
    ends = np.cumsum(LENGTHS)
    g.create_array("meta/episode_ends", shape=ends.shape, dtype="i8", chunks=(1,), shards=(4,))[
        :
    ] = ends
    return path


def test_a_valid_sharded_store_is_accepted_and_a_missing_shard_is_not(tmp_path, capsys):
    store = sharded_store(tmp_path / "sharded.zarr")
    assert validate(store) == []
    assert ReplayBuffer.load(store).n_steps == sum(LENGTHS)
    assert main(["sim", "replay", str(store), "--episodes", "0"]) == 0
    assert "episodes                1" in capsys.readouterr().out
    (store / "data" / "state" / "c" / "1" / "0").unlink()
    problems = validate(store)
    assert problems and "data/state: 1 of 4 shard files missing" in problems[0]


def test_sim_replay_refuses_a_missing_chunk_instead_of_replaying_zeros(tmp_path, capsys):
    store = save_store(tmp_path / "gap.zarr")
    (store / "data" / "action" / "0.0").unlink()
    assert main(["sim", "replay", str(store)]) == 2
    assert "data/action: 1 of 1 chunk files missing" in one_line_error(capsys)


def test_sim_replay_and_render_give_one_line_for_a_truncated_chunk(tmp_path, capsys):
    store = save_store(tmp_path / "cut.zarr")
    chunk = store / "data" / "state" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:-9])
    assert main(["sim", "replay", str(store)]) == 2
    err = one_line_error(capsys)
    assert "data/state" in err and "truncated or corrupt" in err
    out = tmp_path / "x.mp4"
    assert main(["sim", "render", str(store), "--episode", "0", "--out", str(out)]) == 2
    assert "truncated or corrupt" in one_line_error(capsys) and not out.exists()
