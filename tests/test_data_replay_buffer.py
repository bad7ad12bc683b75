"""ReplayBuffer: zarr v2/v3 round trips, appending, and one clear DataError per kind of broken store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr

from diffusion_policy.cli.main import main
from diffusion_policy.data.replay_buffer import ReplayBuffer, get_optimal_chunks, validate
from diffusion_policy.errors import DataError

LENGTHS = (5, 3, 7)


def make_episode(i: int, length: int) -> dict[str, np.ndarray]:
    t = np.arange(length, dtype=np.float32)
    return {
        "action": np.stack([t, t + 100 * i], axis=1),
        "state": np.tile(np.arange(5, dtype=np.float32), (length, 1)) + 10 * i,
        "img": np.full((length, 4, 4, 3), i, dtype=np.uint8),
    }


def make_buffer(lengths=LENGTHS) -> ReplayBuffer:
    buf = ReplayBuffer.create_empty()
    for i, n in enumerate(lengths):
        buf.add_episode(make_episode(i, n))
    return buf


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_buffer().save(tmp_path / "tiny.zarr")


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """mtime and content hash of every file under a store."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_in_memory_episodes():
    buf = make_buffer()
    assert buf.n_episodes == 3 and buf.n_steps == 15
    np.testing.assert_array_equal(buf.episode_ends, [5, 8, 15])
    np.testing.assert_array_equal(buf.episode_lengths, LENGTHS)
    assert buf.episode_slice(1) == slice(5, 8)
    ep = buf.get_episode(2)
    np.testing.assert_array_equal(ep["action"], make_episode(2, 7)["action"])
    assert sorted(buf.keys()) == ["action", "img", "state"]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_save_load_round_trip(tmp_path: Path, zarr_format: int):
    path = make_buffer().save(tmp_path / "s.zarr", zarr_format=zarr_format)
    assert zarr.open_group(str(path), mode="r").metadata.zarr_format == zarr_format
    loaded = ReplayBuffer.load(path)
    assert loaded.backend == "numpy"
    for i in range(3):
        for k, v in make_episode(i, LENGTHS[i]).items():
            np.testing.assert_array_equal(loaded.get_episode(i)[k], v)
            assert loaded[k].dtype == v.dtype
    only = ReplayBuffer.load(path, keys=["state"])
    assert only.keys() == ["state"]
    assert validate(path) == []


def test_append_on_disk(tmp_path: Path):
    path = tmp_path / "grow.zarr"
    buf = ReplayBuffer.create(path)
    buf.add_episode(make_episode(0, 5))
    buf = ReplayBuffer.open(path, "a")  # reopen and keep appending
    buf.add_episode(make_episode(1, 3))
    assert buf.backend == "zarr" and buf.n_episodes == 2
    loaded = ReplayBuffer.load(path)
    np.testing.assert_array_equal(loaded.episode_ends, [5, 8])
    np.testing.assert_array_equal(loaded.get_episode(1)["state"], make_episode(1, 3)["state"])
    with pytest.raises(DataError, match="keys"):
        buf.add_episode({"action": np.zeros((2, 2), np.float32)})
    with pytest.raises(DataError, match="same length|share one length"):
        buf.add_episode({**make_episode(2, 4), "action": np.zeros((3, 2), np.float32)})
    with pytest.raises(DataError, match="read-only"):
        ReplayBuffer.open(path, "r").add_episode(make_episode(2, 4))
    assert validate(path) == []


def test_chunks_are_time_only_about_2mb():
    assert get_optimal_chunks((25650, 96, 96, 3), 4) == (19, 96, 96, 3)  # the spec's example
    assert get_optimal_chunks((10, 96, 96, 3), 4) == (10, 96, 96, 3)
    assert get_optimal_chunks((0, 5), 4) == (100_000, 5)
    assert get_optimal_chunks((100, 2000, 2000), 4) == (
        1,
        250,
        2000,
    )  # a frame over 2 MB: split it, time chunk 1


def test_reading_never_modifies_store(store: Path):
    before = snapshot(store)
    ReplayBuffer.load(store)
    ReplayBuffer.open(store, "r").get_episode(1)
    assert validate(store) == []
    assert main(["data", "info", str(store)]) == 0
    assert snapshot(store) == before


def test_real_store_opens_read_only(pusht_zarr: Path):
    before = {p: p.stat().st_mtime_ns for p in (pusht_zarr / "meta").rglob("*")}
    buf = ReplayBuffer.load(pusht_zarr, keys=["state", "action"])
    assert buf.n_episodes == 206 and buf.n_steps == 25650
    assert buf["state"].shape == (25650, 5) and buf["action"].dtype == np.float32
    assert {p: p.stat().st_mtime_ns for p in (pusht_zarr / "meta").rglob("*")} == before


# ---------------------------------------------------------------- broken stores
def _chunk_files(store: Path, key: str) -> list[Path]:
    meta = {"zarr.json", ".zarray", ".zattrs"}
    return sorted(p for p in (store / key).rglob("*") if p.is_file() and p.name not in meta)


def break_missing_key(store: Path) -> None:
    g = zarr.open_group(str(store), mode="a")
    del g["meta/episode_ends"]


def break_lengths(store: Path) -> None:
    a = zarr.open_group(str(store), mode="a")["data/state"]
    a.resize((a.shape[0] - 1, 5))


def break_ends(store: Path) -> None:
    zarr.open_group(str(store), mode="a")["meta/episode_ends"][1] = 2  # 5, 2, 15


def break_nan(store: Path) -> None:
    zarr.open_group(str(store), mode="a")["data/action"][6, 0] = np.nan


def break_dtype(store: Path) -> None:
    g = zarr.open_group(str(store), mode="a")
    ends = g["meta/episode_ends"][:]
    del g["meta/episode_ends"]
    g.create_array("meta/episode_ends", data=ends.astype(np.float64))


def break_truncate(store: Path) -> None:
    f = _chunk_files(store, "data/state")[0]
    f.write_bytes(f.read_bytes()[:-7])


def break_corrupt_byte(store: Path) -> None:
    f = _chunk_files(store, "data/action")[0]
    b = bytearray(f.read_bytes())
    b[-6] ^= 0xFF
    f.write_bytes(bytes(b))


def break_delete_chunk(store: Path) -> None:
    _chunk_files(store, "data/state")[0].unlink()


BROKEN = {
    "missing_key": (break_missing_key, "meta/episode_ends"),
    "lengths": (break_lengths, "data/state: length 14"),
    "decreasing_ends": (break_ends, "not strictly increasing"),
    "nan": (break_nan, "data/action: 1 NaN/Inf"),
    "dtype": (break_dtype, "not an integer type"),
    "truncated_chunk": (break_truncate, "data/state"),
    "corrupt_chunk": (break_corrupt_byte, "data/action"),
    "deleted_chunk": (break_delete_chunk, "chunk files missing"),
}


# Every broken case in both formats, except a flipped byte in a v2 chunk: v2 chunks carry no checksum,
# so a flipped byte inside a Blosc frame can decode silently (a documented limit of the v2 format).
BROKEN_CASES = [(c, f) for c in BROKEN for f in (2, 3) if (c, f) != ("corrupt_chunk", 2)]


@pytest.mark.parametrize(("case", "zarr_format"), BROKEN_CASES)
def test_broken_store_raises_one_clear_error(tmp_path: Path, case: str, zarr_format: int, capsys):
    path = make_buffer().save(tmp_path / "b.zarr", zarr_format=zarr_format)
    breaker, expected = BROKEN[case]
    breaker(path)
    problems = validate(path)
    assert problems and any(expected in p for p in problems), problems
    assert all(str(path) in p for p in problems)
    with pytest.raises(DataError, match=str(path)):
        ReplayBuffer.load(path)
    assert main(["data", "validate", str(path)]) == 1
    assert expected in capsys.readouterr().out


def test_missing_store(tmp_path: Path, capsys):
    missing = tmp_path / "nope.zarr"
    assert validate(missing) and "no such dataset store" in validate(missing)[0]
    with pytest.raises(DataError, match="nope.zarr"):
        ReplayBuffer.load(missing)
    with pytest.raises(DataError, match="missing key data/pixels"):
        ReplayBuffer.load(make_buffer().save(tmp_path / "s.zarr"), keys=["img", "pixels"])
    assert main(["data", "info", str(missing)]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_info(store: Path, capsys):
    assert main(["data", "info", str(store)]) == 0
    out = capsys.readouterr().out
    assert (
        "episodes  3" in out and "steps     15" in out and "min 3  median 5  mean 5.0  max 7" in out
    )
    assert "data/img" in out and "uint8" in out


def test_validate_ok_cli(store: Path, capsys):
    assert main(["data", "validate", str(store)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_appending_all_zero_chunks_keeps_the_store_valid(tmp_path):
    """Reopened for appending, arrays still write every chunk file (zarr skips all-zero ones by default)."""
    from diffusion_policy.data.replay_buffer import ReplayBuffer, validate

    p = tmp_path / "zeros.zarr"
    ReplayBuffer.create(p).add_episode({"a": np.zeros((3, 2), np.float32)})
    ReplayBuffer.open(p, "a").add_episode({"a": np.zeros((2, 2), np.float32)})
    assert validate(p) == []
    assert ReplayBuffer.load(p).n_steps == 5
