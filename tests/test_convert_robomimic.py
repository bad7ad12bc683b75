"""`dp data convert robomimic`: a file in robomimic's documented layout -> the replay-buffer store.

The file is written the way robomimic's dataset_states_to_obs.py and split_train_val.py write theirs:
data/ (total, env_args JSON), data/demo_N (num_samples) with actions, states, rewards, dones,
obs/<key> and next_obs/<key>; mask/<filter key> as an array of demo names in bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from declared import train_two_steps

from diffusion_policy.cli.main import main
from diffusion_policy.data.replay_buffer import ReplayBuffer, validate

h5py = pytest.importorskip("h5py", reason="h5py is a dependency (pyproject.toml); pip install h5py")

# demo name -> length, written in this (shuffled) order; robomimic's order is by N: 0, 1, 2, 10
LENGTHS = {"demo_10": 6, "demo_2": 4, "demo_0": 5, "demo_1": 7}
ORDER = ["demo_0", "demo_1", "demo_2", "demo_10"]
LOW_DIM = {"robot0_eef_pos": (3,), "robot0_eef_quat": (4,), "robot0_gripper_qpos": (2,), "object": (14,)}  # fmt: skip
IMAGES = {"agentview_image": (84, 84, 3), "robot0_eye_in_hand_image": (84, 84, 3)}
ACTION_DIM = 7


def _demo_arrays(name: str, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(name.split("_")[1]))
    obs = {k: rng.normal(size=(n, *s)) for k, s in LOW_DIM.items()}  # float64, as robosuite's
    obs |= {k: rng.integers(0, 256, size=(n, *s), dtype=np.uint8) for k, s in IMAGES.items()}
    return {"actions": rng.uniform(-1, 1, size=(n, ACTION_DIM)), **{f"obs/{k}": v for k, v in obs.items()}}  # fmt: skip


def write_robomimic(path: Path, lengths: dict[str, int] = LENGTHS) -> Path:
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for name, n in lengths.items():
            grp = data.create_group(name)
            arrays = _demo_arrays(name, n)
            for key, x in arrays.items():
                grp.create_dataset(key, data=x, compression="gzip" if x.ndim == 4 else None)
                if key.startswith("obs/"):  # next_obs: the obs shifted by one, as robomimic's
                    grp.create_dataset("next_" + key, data=np.concatenate([x[1:], x[-1:]]))
            grp.create_dataset("states", data=np.zeros((n, 32)))
            grp.create_dataset("rewards", data=np.zeros(n))
            grp.create_dataset("dones", data=np.eye(1, n, n - 1)[0])
            grp.attrs["num_samples"] = n
        data.attrs["total"] = sum(lengths.values())
        env_args = {"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}}
        data.attrs["env_args"] = json.dumps(env_args, indent=4)
        f["mask/train"] = np.array(["demo_10", "demo_0", "demo_2"], dtype="S")
        f["mask/valid"] = np.array(["demo_1"], dtype="S")
    return path


@pytest.fixture
def hdf5(tmp_path: Path) -> Path:
    return write_robomimic(tmp_path / "low_dim_image.hdf5")


def _expected(demos: list[str], keys: list[str]) -> dict[str, np.ndarray]:
    per_demo = [_demo_arrays(d, LENGTHS[d]) for d in demos]
    out = {k: np.concatenate([a[f"obs/{k}"] for a in per_demo]) for k in keys}
    out["action"] = np.concatenate([a["actions"] for a in per_demo])
    return out


def _check_store(out: Path, demos: list[str], keys: list[str]) -> None:
    assert validate(out) == []
    buf = ReplayBuffer.load(out)
    assert buf.episode_ends.tolist() == np.cumsum([LENGTHS[d] for d in demos]).tolist()
    want = _expected(demos, keys)
    assert sorted(buf.keys()) == sorted(want)
    for k, x in want.items():
        got = buf[k]
        if k in IMAGES:
            assert got.dtype == np.uint8 and got.shape[1:] == IMAGES[k]
            np.testing.assert_array_equal(got, x)
        else:
            assert got.dtype == np.float32, k
            np.testing.assert_array_equal(got, x.astype(np.float32))


def test_converts_every_demo_in_natural_order(hdf5, tmp_path, capsys):
    out = tmp_path / "store.zarr"
    assert main(["data", "convert", "robomimic", str(hdf5), "--out", str(out)]) == 0
    _check_store(out, ORDER, [*LOW_DIM, *IMAGES])
    printed = capsys.readouterr().out
    assert "4 episodes, 22 steps" in printed
    assert f"dp data info {out}" in printed
    import zarr

    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["source"] == "robomimic" and attrs["env_args"]["env_name"] == "Lift"
    assert not list(tmp_path.glob(".store.zarr.*"))  # the temporary store was renamed


def test_filter_key_and_chosen_keys(hdf5, tmp_path):
    out = tmp_path / "train.zarr"
    keys = "agentview_image,robot0_eef_pos"
    args = ["data", "convert", "robomimic", str(hdf5), "--out", str(out), "--filter-key", "train"]
    assert main([*args, "--keys", keys]) == 0
    _check_store(out, ["demo_0", "demo_2", "demo_10"], keys.split(","))
    valid = tmp_path / "valid.zarr"
    assert main([*args[:-3], str(valid), "--filter-key", "valid"]) == 0
    _check_store(valid, ["demo_1"], [*LOW_DIM, *IMAGES])


def _break(path: Path, how: str) -> None:
    with h5py.File(path, "a") as f:
        if how == "no data":
            del f["data"]
        elif how == "no actions":
            del f["data/demo_2/actions"]
        elif how == "no obs":
            del f["data/demo_1/obs"]
        elif how == "short obs":
            x = f["data/demo_10/obs/robot0_eef_pos"][()]
            del f["data/demo_10/obs/robot0_eef_pos"]
            f["data/demo_10/obs/robot0_eef_pos"] = x[:-1]
        elif how == "nan":
            f["data/demo_2/actions"][1, 3] = np.nan


@pytest.mark.parametrize(
    "how, extra, message",
    [
        ("no data", [], "no group data/"),
        ("no actions", [], "data/demo_2: no actions dataset"),
        ("no obs", [], "data/demo_1: no obs group"),
        ("short obs", [], "data/demo_10/obs/robot0_eef_pos: 5 frames but actions has 6"),
        ("nan", [], "data/demo_2: data/action: 1 NaN/Inf value(s)"),
        (None, ["--filter-key", "test"], "unknown filter key 'test' (have: train, valid)"),
        (None, ["--keys", "robot0_joint_pos"], "data/demo_0/obs: no key 'robot0_joint_pos'"),
    ],
)
def test_bad_files_are_one_line_errors(hdf5, tmp_path, capsys, how, extra, message):
    if how:
        _break(hdf5, how)
    out = tmp_path / "out.zarr"
    assert main(["data", "convert", "robomimic", str(hdf5), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.zarr.*"))  # nothing half-written


def test_not_hdf5_and_existing_out_are_one_line_errors(hdf5, tmp_path, capsys):
    fake = tmp_path / "fake.hdf5"
    fake.write_text("not hdf5")
    assert main(["data", "convert", "robomimic", str(fake), "--out", str(tmp_path / "o")]) == 2
    assert "not an HDF5 file" in capsys.readouterr().err
    with h5py.File(tmp_path / "nomask.hdf5", "w") as f:
        f.create_group("data/demo_0")
    args = ["--out", str(tmp_path / "o"), "--filter-key", "train"]
    assert main(["data", "convert", "robomimic", str(tmp_path / "nomask.hdf5"), *args]) == 2
    assert "have: none: the file has no mask/ group" in capsys.readouterr().err
    (tmp_path / "exists.zarr").mkdir()
    assert main(["data", "convert", "robomimic", str(hdf5), "--out", str(tmp_path / "exists.zarr")]) == 2  # fmt: skip
    assert "already exists" in capsys.readouterr().err


# needs the declared task spec (issue 13 item 1)
def test_converted_store_trains(hdf5, tmp_path):
    """robomimic HDF5 -> convert -> `dp train` a few steps on a declared task (no simulator)."""
    store = tmp_path / "lift.zarr"
    assert main(["data", "convert", "robomimic", str(hdf5), "--out", str(store)]) == 0
    task = {
        "name": "robomimic_lift",
        "dataset": str(store),
        "env_id": None,
        "control_hz": 20.0,
        "obs": {
            "agentview": {"kind": "rgb", "source": ["agentview_image"]},
            "wrist": {"kind": "rgb", "source": ["robot0_eye_in_hand_image"]},
            "state": {
                "kind": "low_dim",
                "source": ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos[0:1]"],
            },
        },
        "action": {"source": ["action"]},
    }
    train_two_steps(tmp_path, task)
