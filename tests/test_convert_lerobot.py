"""`dp data convert lerobot` / `dp data export lerobot`: LeRobotDataset v3.0 in and out.

Unit tests write datasets in LeRobot's v3.0 layout with PyAV (our exporter, whose info.json equals
what LeRobot 0.4.4's writer produces for the same features) and need no LeRobot. The acceptance
test uses the real peer: LeRobot's own writer records a two-camera AV1 dataset and LeRobot's own
loader reads our export, in the LeRobot venv (scripts/setup_lerobot_venv.sh; skips without it).
"""

from __future__ import annotations

import json
import os
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from diffusion_policy.cli.main import main  # noqa: E402
from diffusion_policy.data.convert.lerobot import convert_lerobot, export_lerobot  # noqa: E402
from diffusion_policy.data.replay_buffer import ReplayBuffer  # noqa: E402
from diffusion_policy.errors import DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEROBOT_VENV = REPO / ".bench" / "lerobot" / ".venv"
WORKER = REPO / "scripts" / "_lerobot_dataset_worker.py"
H, W, FPS = 48, 64, 10
LENGTHS = (12, 9, 15)
# Mean absolute error per pixel (of 255) the codecs may add at LeRobot's crf 30 on these frames.
CODEC_MAE = 8.0


def frame(t: int, cam: int) -> np.ndarray:
    """A smooth pattern plus a bright bar whose place and colour change every frame, so a frame
    matched to the wrong row is off by more than twice the codec's error)."""
    yy, xx = np.mgrid[0:H, 0:W]
    a = np.zeros((H, W, 3), np.uint8)
    a[..., 0] = (xx * 4 + t * 7 + cam * 50) % 256
    a[..., 1] = (yy * 5 + cam * 90) % 256
    a[..., 2] = ((xx + yy) * 2 + t * 11) % 256
    x0 = (t * 3) % (W - 10)
    a[10:30, x0 : x0 + 10] = 255
    return a


def demo_arrays(lengths=LENGTHS) -> dict[str, np.ndarray]:
    n = sum(lengths)
    rng = np.random.default_rng(0)
    return {
        "front": np.stack([frame(t, 0) for t in range(n)]),
        "wrist": np.stack([frame(t, 1) for t in range(n)]),
        "state": rng.standard_normal((n, 7)).astype(np.float32),
        "action": rng.standard_normal((n, 7)).astype(np.float32),
        "episode_ends": np.cumsum(lengths),
    }


def make_store(path: Path, d: dict[str, np.ndarray]) -> Path:
    buf = ReplayBuffer.create_empty()
    start = 0
    for end in d["episode_ends"]:
        buf.add_episode({k: v[start:end] for k, v in d.items() if k != "episode_ends"})
        start = int(end)
    return buf.save(path)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


@pytest.fixture(scope="module")
def given() -> dict[str, np.ndarray]:
    return demo_arrays()


@pytest.fixture(scope="module", params=["libsvtav1", "h264"])
def lerobot_dir(request, tmp_path_factory, given) -> Path:
    """A v3.0 directory written with PyAV: two cameras, all episodes in one parquet and one mp4 each."""
    tmp = tmp_path_factory.mktemp(request.param)
    store = make_store(tmp / "src.zarr", given)
    return export_lerobot(store, tmp / "ds", fps=FPS, vcodec=request.param, task="pick").out


def test_export_writes_lerobot_v30_layout(lerobot_dir: Path, given) -> None:
    info = json.loads((lerobot_dir / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS
    assert info["total_episodes"] == 3 and info["total_frames"] == sum(LENGTHS)
    front = info["features"]["observation.images.front"]
    assert front["dtype"] == "video" and front["shape"] == [H, W, 3]
    assert front["info"]["video.codec"] in ("av1", "h264")
    assert info["features"]["observation.state"] == {
        "dtype": "float32",
        "shape": [7],
        "names": None,
    }
    eps = pq.read_table(lerobot_dir / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in eps] == list(LENGTHS)
    # several episodes share one mp4; from_timestamp locates each
    starts = [e["videos/observation.images.wrist/from_timestamp"] for e in eps]
    assert starts == pytest.approx([0.0, 1.2, 2.1])
    assert {e["videos/observation.images.front/file_index"] for e in eps} == {0}
    stats = json.loads((lerobot_dir / "meta/stats.json").read_text())
    assert np.allclose(stats["observation.state"]["mean"], given["state"].mean(0), atol=1e-6)
    assert np.array(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)


def test_convert_matches_the_frames_and_values_written(lerobot_dir: Path, given, tmp_path) -> None:
    r = convert_lerobot(lerobot_dir, tmp_path / "out.zarr")
    assert (r.episodes, r.frames) == (3, sum(LENGTHS))
    buf = ReplayBuffer.load(r.out)
    assert sorted(buf.keys()) == ["action", "front", "state", "wrist"]
    assert np.array_equal(buf.episode_ends, given["episode_ends"])
    assert buf["front"].dtype == np.uint8 and buf["front"].shape == (sum(LENGTHS), H, W, 3)
    assert buf["state"].dtype == np.float32
    np.testing.assert_array_equal(buf["state"], given["state"])
    np.testing.assert_array_equal(buf["action"], given["action"])
    for cam in ("front", "wrist"):
        assert mae(buf[cam], given[cam]) < CODEC_MAE
        # each frame is nearer its own row than the neighbouring row: matched by timestamp
        assert mae(buf[cam][1:], given[cam][:-1]) > 2 * mae(buf[cam], given[cam])


def test_round_trip_keeps_names_fps_and_tasks(lerobot_dir: Path, tmp_path) -> None:
    a = convert_lerobot(lerobot_dir, tmp_path / "a.zarr").out
    back = export_lerobot(a, tmp_path / "again").out  # fps and feature names come from the store
    b = ReplayBuffer.load(convert_lerobot(back, tmp_path / "b.zarr").out)
    info = json.loads((back / "meta/info.json").read_text())
    assert info["fps"] == FPS and "observation.images.front" in info["features"]
    tasks = pq.read_table(back / "meta/tasks.parquet").to_pylist()
    assert tasks == [{"task_index": 0, "__index_level_0__": "pick"}]
    np.testing.assert_array_equal(b["state"], ReplayBuffer.load(a)["state"])
    assert mae(b["front"], ReplayBuffer.load(a)["front"]) < CODEC_MAE


def _damaged_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, fn) -> None:
    table = pq.read_table(path)
    pq.write_table(fn(table), path)


def test_missing_frame_is_one_line_and_leaves_no_store(lerobot_dir, given, tmp_path, capsys):
    ds = _damaged_copy(lerobot_dir, tmp_path / "ds")
    mp4 = ds / "videos/observation.images.wrist/chunk-000/file-000.mp4"
    keep = [t for t in range(sum(LENGTHS)) if t != 16]  # frame 4 of episode 1 lost: a gap in time
    write_mp4(mp4, given["wrist"][keep], pts=keep)
    out = tmp_path / "out.zarr"
    assert main(["data", "convert", "lerobot", str(ds), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "episode 1 observation.images.wrist" in err and "frames are missing" in err
    assert not out.exists() and not (tmp_path / "out.zarr.partial").exists()


def write_mp4(path: Path, frames: np.ndarray, pts: list[int]) -> None:
    """An H.264 file whose frames sit at `pts` / FPS seconds (gaps where frames were lost)."""
    import av

    path.unlink(missing_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("h264", rate=FPS)
        s.width, s.height, s.pix_fmt, s.time_base = W, H, "yuv420p", Fraction(1, FPS)
        for img, t in zip(frames, pts):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = t
            for packet in s.encode(f):
                c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)


def test_truncated_video_is_one_line(lerobot_dir, given, tmp_path) -> None:
    ds = _damaged_copy(lerobot_dir, tmp_path / "ds")
    mp4 = ds / "videos/observation.images.front/chunk-000/file-000.mp4"
    n = sum(LENGTHS) - 1  # the last frame of episode 2 never written
    write_mp4(mp4, given["front"][:n], pts=list(range(n)))
    with pytest.raises(DataError, match=r"episode 2 .*the video ends\): frames are missing"):
        convert_lerobot(ds, tmp_path / "out.zarr")


def test_unknown_codec_is_one_line(lerobot_dir, tmp_path) -> None:
    ds = _damaged_copy(lerobot_dir, tmp_path / "ds")
    mp4 = ds / "videos/observation.images.front/chunk-000/file-000.mp4"
    raw = mp4.read_bytes()
    tag = b"av01" if b"av01" in raw else b"avc1"
    mp4.write_bytes(raw.replace(tag, b"zzzz"))
    with pytest.raises(DataError, match="unknown video codec") as e:
        convert_lerobot(ds, tmp_path / "out.zarr")
    assert "\n" not in str(e.value) and "file-000.mp4" in str(e.value)


def test_missing_key_is_one_line(lerobot_dir, tmp_path) -> None:
    ds = _damaged_copy(lerobot_dir, tmp_path / "ds")
    _rewrite(ds / "data/chunk-000/file-000.parquet", lambda t: t.drop(["observation.state"]))
    with pytest.raises(DataError, match="missing column 'observation.state'"):
        convert_lerobot(ds, tmp_path / "out.zarr")
    info_path = ds / "meta/info.json"
    info = json.loads(info_path.read_text())
    del info["features"]["timestamp"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match="features has no 'timestamp'"):
        convert_lerobot(ds, tmp_path / "out.zarr")


def test_mismatched_lengths_are_one_line(lerobot_dir, tmp_path) -> None:
    import pyarrow as pa

    ds = _damaged_copy(lerobot_dir, tmp_path / "ds")
    eps = ds / "meta/episodes/chunk-000/file-000.parquet"

    def longer(t):
        lengths = t.column("length").to_numpy().copy()
        lengths[1] += 2
        return t.set_column(t.schema.get_field_index("length"), "length", pa.array(lengths))

    _rewrite(eps, longer)
    with pytest.raises(DataError, match="episode 1 has 9 rows, the episode metadata says 11"):
        convert_lerobot(ds, tmp_path / "out.zarr")


def test_v21_layout_converts(lerobot_dir, given, tmp_path) -> None:
    """v2.1: one parquet and one mp4 per episode, meta/episodes.jsonl, videos from t = 0."""
    ds = tmp_path / "v21"
    info = json.loads((lerobot_dir / "meta/info.json").read_text())
    info.update(
        codebase_version="v2.1",
        data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
    )
    (ds / "meta").mkdir(parents=True)
    (ds / "meta/info.json").write_text(json.dumps(info))
    table = pq.read_table(lerobot_dir / "data/chunk-000/file-000.parquet")
    lines, start = [], 0
    for i, n in enumerate(LENGTHS):
        (ds / "data/chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(start, n), ds / f"data/chunk-000/episode_{i:06d}.parquet")
        for cam in ("front", "wrist"):
            mp4 = ds / f"videos/chunk-000/observation.images.{cam}/episode_{i:06d}.mp4"
            mp4.parent.mkdir(parents=True, exist_ok=True)
            write_mp4(mp4, given[cam][start : start + n], pts=list(range(n)))
        lines.append(json.dumps({"episode_index": i, "tasks": ["pick"], "length": n}))
        start += n
    (ds / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")
    buf = ReplayBuffer.load(convert_lerobot(ds, tmp_path / "out.zarr").out)
    assert np.array_equal(buf.episode_ends, given["episode_ends"])
    np.testing.assert_array_equal(buf["action"], given["action"])
    assert mae(buf["wrist"], given["wrist"]) < CODEC_MAE


def test_convert_refuses_an_existing_store_and_a_non_dataset(tmp_path, lerobot_dir) -> None:
    (tmp_path / "taken.zarr").mkdir()
    with pytest.raises(DataError, match="already exists"):
        convert_lerobot(lerobot_dir, tmp_path / "taken.zarr")
    with pytest.raises(DataError, match="no meta/info.json"):
        convert_lerobot(tmp_path, tmp_path / "x.zarr")


def test_export_needs_a_frame_rate(tmp_path, given) -> None:
    store = make_store(tmp_path / "s.zarr", given)
    with pytest.raises(DataError, match="pass --fps"):
        export_lerobot(store, tmp_path / "ds")


# --- the real peer: LeRobot 0.4.4's own writer and loader --------------------------------------------


def lerobot_python() -> Path:
    python = LEROBOT_VENV / "bin" / "python"
    if not python.exists():
        failed = LEROBOT_VENV.parent / ".venv.failed"
        why = failed.read_text().strip().splitlines()[0] if failed.exists() else "not built"
        pytest.skip(
            f"LeRobot venv {LEROBOT_VENV} is missing ({why}); run scripts/setup_lerobot_venv.sh"
        )
    check = "import lerobot.datasets.lerobot_dataset, torchcodec.decoders"
    res = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    if res.returncode != 0:  # e.g. made by scripts/bench_lerobot.py, which installs no torchcodec
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(
            f"LeRobot venv {LEROBOT_VENV} cannot load datasets ({last}); "
            "run scripts/setup_lerobot_venv.sh"
        )
    return python


def run_peer(python: Path, *args: str | Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["HF_HOME"] = str(Path(args[-1]).parent / "hf_home")  # never the user's HF cache
    res = subprocess.run(
        [str(python), str(WORKER), *map(str, args)], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_lerobot_writer_to_store_and_our_export_to_lerobot_loader(tmp_path, given) -> None:
    python = lerobot_python()
    np.savez(tmp_path / "given.npz", **given)
    theirs = tmp_path / "theirs"
    run_peer(python, "record", tmp_path / "given.npz", theirs, FPS, "libsvtav1")
    info = json.loads((theirs / "meta/info.json").read_text())
    assert info["features"]["observation.images.front"]["info"]["video.codec"] == "av1"

    buf = ReplayBuffer.load(convert_lerobot(theirs, tmp_path / "ours.zarr").out)
    assert np.array_equal(buf.episode_ends, given["episode_ends"])
    np.testing.assert_array_equal(buf["state"], given["state"])
    np.testing.assert_array_equal(buf["action"], given["action"])
    for cam in ("front", "wrist"):
        assert mae(buf[cam], given[cam]) < CODEC_MAE
        assert mae(buf[cam][1:], given[cam][:-1]) > 2 * mae(buf[cam], given[cam])

    export_lerobot(tmp_path / "ours.zarr", tmp_path / "export")
    report = run_peer(python, "load", tmp_path / "export", tmp_path / "loaded.npz")
    assert report == {"episodes": 3, "frames": sum(LENGTHS), "fps": FPS}
    loaded = np.load(tmp_path / "loaded.npz")
    np.testing.assert_array_equal(loaded["state"], buf["state"])
    np.testing.assert_array_equal(loaded["action"], buf["action"])
    ends = np.repeat(np.arange(3), LENGTHS)
    np.testing.assert_array_equal(loaded["episode_index"], ends)
    for cam in ("front", "wrist"):
        assert mae(loaded[cam], buf[cam]) < CODEC_MAE
