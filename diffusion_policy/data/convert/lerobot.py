"""LeRobotDataset v3.0 (and v2.1) directory <-> replay-buffer zarr store.

LeRobot v3.0 layout (lerobot 0.4.x, datasets/utils.py):
    meta/info.json                               fps, features (dtype, shape), data_path, video_path
    meta/episodes/chunk-000/file-000.parquet     one row per episode: length, data/{chunk,file}_index,
                                                 videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp}
    meta/tasks.parquet, meta/stats.json
    data/chunk-000/file-000.parquet              one row per frame, many episodes per file
    videos/<key>/chunk-000/file-000.mp4          many episodes back to back per file
An episode's frame at table timestamp t is the video frame at `from_timestamp + t` (within
`tolerance_s`, 1e-4 s in LeRobot). v2.1 has one parquet and one mp4 per episode (from_timestamp 0).

Store keys drop LeRobot's `observation.` / `observation.images.` prefixes (`observation.images.front`
-> `front`, `observation.state` -> `state`, `action` stays): that is how the original's stores and our
task specs name keys, and a spec's obs key can then be the store key. The LeRobot name of each key
is kept in the store's attrs (`lerobot.features`), so an export writes the same names back.
stats.json is never read: our training computes its normalisation from the data.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.data.convert.video import CODEC_NAMES, FrameCursor, VideoWriter
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.errors import DataError

DEFAULT_TOLERANCE_S = 1e-4  # LeRobotDataset's default tolerance_s
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
PREFIXES = ("observation.images.", "observation.image.", "observation.")
CHUNKS_SIZE = 1000  # LeRobot's files per chunk directory
DATA_FILE_MB, VIDEO_FILE_MB = 100, 200  # LeRobot's default file sizes
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"


def store_key(feature: str) -> str:
    """`observation.images.front` -> `front`, `observation.state` -> `state`, `action` -> `action`."""
    for prefix in PREFIXES:
        if feature.startswith(prefix) and len(feature) > len(prefix):
            return feature[len(prefix) :]
    return feature


def lerobot_feature(key: str, is_image: bool) -> str:
    """The inverse naming for a store that did not come from LeRobot."""
    if is_image:
        return f"observation.images.{key}"
    return key if key == "action" or key.startswith("observation.") else f"observation.{key}"


@dataclass
class Episode:
    """Where one episode's rows and frames are: its data file, and per video key (file, start time)."""

    index: int
    length: int
    data_file: Path
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)


# --- reading ---------------------------------------------------------------------------------------


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # a declared dependency; an old environment may still lack it
        raise DataError("reading LeRobot datasets needs pyarrow: pip install pyarrow") from e
    return pa, pq


def read_info(root: Path) -> dict[str, Any]:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise DataError(f"{root}: no meta/info.json (not a LeRobotDataset directory)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    for key in ("codebase_version", "fps", "features"):
        if key not in info:
            raise DataError(f"{path}: missing key {key!r}")
    if info["codebase_version"] not in ("v3.0", "v2.1"):
        raise DataError(
            f"{path}: codebase_version {info['codebase_version']!r} is not supported (v3.0 or v2.1)"
        )
    return info


def _read_table(path: Path, columns: list[str] | None = None):
    pa, pq = _pa()
    if not path.is_file():
        raise DataError(f"{path}: parquet file missing")
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from e
    return table


def _episodes_v30(root: Path, info: dict, video_keys: list[str]) -> list[Episode]:
    files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if not files:
        raise DataError(f"{root}: no meta/episodes/*/*.parquet (episode metadata missing)")
    rows: list[dict] = []
    for f in files:
        rows += _read_table(f).to_pylist()
    need = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    for k in video_keys:
        need += [f"videos/{k}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
    episodes = []
    for r in sorted(rows, key=lambda r: r.get("episode_index", -1)):
        missing = [c for c in need if r.get(c) is None]
        if missing:
            raise DataError(
                f"{root}/meta/episodes: episode {r.get('episode_index')}: missing column {missing[0]}"
            )
        data = root / info["data_path"].format(
            chunk_index=r["data/chunk_index"], file_index=r["data/file_index"]
        )
        videos = {
            k: (
                root
                / info["video_path"].format(
                    video_key=k,
                    chunk_index=r[f"videos/{k}/chunk_index"],
                    file_index=r[f"videos/{k}/file_index"],
                ),
                float(r[f"videos/{k}/from_timestamp"]),
            )
            for k in video_keys
        }
        tasks = list(r.get("tasks") or [])
        episodes.append(Episode(int(r["episode_index"]), int(r["length"]), data, videos, tasks))
    return episodes


def _episodes_v21(root: Path, info: dict, video_keys: list[str]) -> list[Episode]:
    path = root / "meta" / "episodes.jsonl"
    if not path.is_file():
        raise DataError(f"{root}: no meta/episodes.jsonl (v2.1 episode metadata missing)")
    chunks = int(info.get("chunks_size", CHUNKS_SIZE))
    episodes = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        i = int(r["episode_index"])
        fmt = {"episode_chunk": i // chunks, "episode_index": i}
        data = root / info["data_path"].format(**fmt)
        videos = {
            k: (root / info["video_path"].format(video_key=k, **fmt), 0.0) for k in video_keys
        }
        episodes.append(Episode(i, int(r["length"]), data, videos, list(r.get("tasks") or [])))
    return sorted(episodes, key=lambda e: e.index)


def _column(table, name: str, shape: tuple[int, ...], where: Path) -> np.ndarray:
    """A numeric column as (N, *shape): scalars, fixed-size or variable lists (nested lists flatten)."""
    pa, _ = _pa()
    col = table.column(name).combine_chunks()
    if col.null_count:
        raise DataError(f"{where}: column {name!r} has {col.null_count} null value(s)")
    n, values = len(col), col
    while (
        pa.types.is_list(values.type)
        or pa.types.is_large_list(values.type)
        or (pa.types.is_fixed_size_list(values.type))
    ):
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    size = int(np.prod(shape))
    if flat.size != n * size:
        raise DataError(
            f"{where}: column {name!r} holds {flat.size} values for {n} rows, "
            f"info.json declares shape {list(shape)} (mismatched lengths)"
        )
    return flat.reshape(n, *shape)


def _decode_images(table, name: str, shape: tuple[int, ...], where: Path) -> np.ndarray:
    """`image` features: PNG/JPEG bytes embedded in the parquet (struct {bytes, path})."""
    import cv2

    out = np.empty((table.num_rows, *shape), dtype=np.uint8)
    for i, cell in enumerate(table.column(name).to_pylist()):
        data = (cell or {}).get("bytes")
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if img is None:
            raise DataError(f"{where}: {name}: row {i} holds no decodable embedded image")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img.shape != shape:
            raise DataError(f"{where}: {name}: row {i} is {img.shape}, info.json declares {shape}")
        out[i] = img
    return out


class _Rows:
    """Per-episode rows of the data parquet files, one file held at a time."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        self._path: Path | None = None
        self._table = None
        self._ep: np.ndarray | None = None

    def episode(self, ep: Episode):
        if ep.data_file != self._path:
            table = _read_table(ep.data_file)
            missing = [c for c in self.columns if c not in table.column_names]
            if missing:
                raise DataError(
                    f"{ep.data_file}: missing column {missing[0]!r} that info.json declares"
                )
            self._path, self._table = ep.data_file, table
            self._ep = table.column("episode_index").to_numpy()
        rows = np.flatnonzero(self._ep == ep.index)
        if len(rows) != ep.length:
            raise DataError(
                f"{ep.data_file}: episode {ep.index} has {len(rows)} rows, the episode metadata says "
                f"{ep.length} (mismatched lengths)"
            )
        table = self._table.take(rows)
        order = np.argsort(table.column("frame_index").to_numpy(), kind="stable")
        return table.take(order)


def _plan(info: dict, where: Path) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """(feature -> store key, video features, image features, numeric features)."""
    feats = info["features"]
    for name in ("timestamp", "frame_index", "episode_index"):
        if name not in feats:
            raise DataError(f"{where}: features has no {name!r}")
    videos = [k for k, f in feats.items() if f.get("dtype") == "video"]
    images = [k for k, f in feats.items() if f.get("dtype") == "image"]
    numeric = [
        k
        for k, f in feats.items()
        if k not in INDEX_COLUMNS and f.get("dtype") not in ("video", "image", "string")
    ]
    names: dict[str, str] = {}
    for k in videos + images + numeric:
        key = store_key(k)
        if key in names.values() or "/" in key:
            raise DataError(f"{where}: feature {k!r} maps to store key {key!r}, which is taken")
        names[k] = key
    if videos and not info.get("video_path"):
        raise DataError(f"{where}: video features but no video_path in info.json")
    return names, videos, images, numeric


def _episode_arrays(
    table, ep: Episode, plan, info: dict, cursors: dict[str, FrameCursor], tolerance_s: float
) -> dict[str, np.ndarray]:
    names, videos, images, numeric = plan
    feats = info["features"]
    out: dict[str, np.ndarray] = {}
    for k in numeric:
        x = _column(table, k, tuple(feats[k]["shape"]), ep.data_file)
        if x.dtype.kind == "f":
            x = x.astype(np.float32)
        out[names[k]] = x
    for k in images:
        out[names[k]] = _decode_images(table, k, tuple(feats[k]["shape"]), ep.data_file)
    ts = _column(table, "timestamp", (1,), ep.data_file)[:, 0].astype(np.float64)
    if len(ts) > 1 and np.any(np.diff(ts) <= 0):
        raise DataError(f"{ep.data_file}: episode {ep.index}: timestamps are not increasing")
    for k in videos:
        path, t0 = ep.videos[k]
        cursor = cursors.get(k)
        if cursor is None or cursor.path != path:
            if cursor is not None:
                cursor.close()
            cursor = cursors[k] = FrameCursor(path, tolerance_s, _hwc(feats[k], k))
        out[names[k]] = cursor.take(t0 + ts, f"episode {ep.index} {k}")
    return out


def _hwc(feature: dict, name: str) -> tuple[int, int, int]:
    shape = tuple(feature.get("shape", ()))
    names = feature.get("names") or []
    if len(shape) != 3:
        raise DataError(f"{name}: video shape {list(shape)} is not (H, W, C)")
    if list(names[:3]) == ["channels", "height", "width"]:
        shape = (shape[1], shape[2], shape[0])
    if shape[2] != 3:
        raise DataError(f"{name}: video has {shape[2]} channels; only RGB (3) converts")
    return shape  # type: ignore[return-value]


@dataclass
class ConvertReport:
    out: Path
    episodes: int
    frames: int
    keys: dict[str, str]  # LeRobot feature -> store key


def convert_lerobot(
    root: str | Path,
    out: str | Path,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertReport:
    """Write a LeRobotDataset directory as a replay-buffer store, one episode in memory at a time.

    The store is built at OUT.partial and renamed when complete, so a failure leaves no store.
    """
    root, out = Path(root), Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it first or pick a new path")
    info = read_info(root)
    plan = _plan(info, root / "meta" / "info.json")
    names, videos = plan[0], plan[1]
    read_eps = _episodes_v30 if info["codebase_version"] == "v3.0" else _episodes_v21
    episodes = read_eps(root, info, videos)
    if not episodes:
        raise DataError(f"{root}: the dataset has no episodes")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cursors: dict[str, FrameCursor] = {}
    rows = _Rows([k for k in names if k not in videos] + ["timestamp", "frame_index"])
    try:
        buf = ReplayBuffer.create(tmp)
        for n, ep in enumerate(episodes):
            table = rows.episode(ep)
            buf.add_episode(_episode_arrays(table, ep, plan, info, cursors, tolerance_s))
            if progress:
                progress(n + 1, len(episodes))
        _write_attrs(tmp, info, names, episodes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for c in cursors.values():
            c.close()
    n_steps = buf.n_steps
    tmp.rename(out)
    return ConvertReport(out, len(episodes), n_steps, names)


def _write_attrs(path: Path, info: dict, names: dict[str, str], episodes: list[Episode]) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="a")
    g.attrs["lerobot"] = {
        "codebase_version": info["codebase_version"],
        "fps": info["fps"],
        "robot_type": info.get("robot_type"),
        "features": {key: feature for feature, key in names.items()},  # store key -> LeRobot name
        "episode_tasks": [ep.tasks[0] if ep.tasks else "" for ep in episodes],
    }


# --- writing -----------------------------------------------------------------------------------------


QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # LeRobot's stats.json q01 .. q99


class _Stats:
    """Per-feature min/max/mean/std/count and quantiles in LeRobot's stats.json layout; images per
    channel in [0, 1] with shape (3, 1, 1). Image quantiles come from exact 256-bin histograms, so
    frames are not kept; low-dim values are kept (small) for exact quantiles."""

    def __init__(self):
        self._low: dict[str, list[np.ndarray]] = {}
        self._img: dict[str, np.ndarray] = {}  # (3, 256) counts
        self._frames: dict[str, int] = {}

    def update(self, name: str, x: np.ndarray, image: bool) -> None:
        self._frames[name] = self._frames.get(name, 0) + len(x)
        if not image:
            self._low.setdefault(name, []).append(x.reshape(len(x), -1).astype(np.float64))
            return
        hist = self._img.setdefault(name, np.zeros((x.shape[-1], 256), dtype=np.int64))
        for c in range(x.shape[-1]):
            hist[c] += np.bincount(x[..., c].ravel(), minlength=256)

    def result(self) -> dict[str, dict[str, list]]:
        out: dict[str, dict[str, list]] = {}
        for name, parts in self._low.items():
            x = np.concatenate(parts)
            values = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
            values.update({f"q{round(q * 100):02d}": np.quantile(x, q, axis=0) for q in QUANTILES})
            out[name] = {k: v.tolist() for k, v in values.items()}
        levels = np.arange(256) / 255.0
        for name, hist in self._img.items():
            n = hist.sum(1)
            mean = hist @ levels / n
            std = np.sqrt(np.maximum(hist @ levels**2 / n - mean**2, 0.0))
            cdf = np.cumsum(hist, 1) / n[:, None]
            values = {
                "min": levels[np.argmax(hist > 0, 1)],
                "max": levels[255 - np.argmax(hist[:, ::-1] > 0, 1)],
                "mean": mean,
                "std": std,
            }
            for q in QUANTILES:
                values[f"q{round(q * 100):02d}"] = levels[np.argmax(cdf >= q, 1)]
            out[name] = {k: np.reshape(v, (-1, 1, 1)).tolist() for k, v in values.items()}
        for name in out:
            out[name]["count"] = [self._frames[name]]
        return out


@dataclass
class ExportReport:
    out: Path
    episodes: int
    frames: int
    features: dict[str, str]  # store key -> LeRobot feature


def _export_plan(buf: ReplayBuffer, attrs: dict) -> tuple[dict[str, str], list[str]]:
    """(store key -> LeRobot feature, image keys): uint8 (N, H, W, 3) arrays become videos."""
    known = attrs.get("features", {})
    names, images = {}, []
    for key in buf.keys():
        arr = buf[key]
        is_image = arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[-1] == 3
        if is_image:
            images.append(key)
        names[key] = known.get(key) or lerobot_feature(key, is_image)
    taken = [n for n in names.values() if n in INDEX_COLUMNS]
    if taken or len(set(names.values())) != len(names):
        raise DataError(f"{buf.path}: store keys map to clashing LeRobot features {sorted(names)}")
    return names, images


class _VideoFiles:
    """One camera's mp4 files: episodes appended back to back, a new file past VIDEO_FILE_MB."""

    def __init__(self, root: Path, feature: str, fps: int, shape: tuple, vcodec: str):
        self.root, self.feature, self.fps, self.shape, self.vcodec = (
            root,
            feature,
            fps,
            shape,
            vcodec,
        )
        self.file = -1
        self.writer: VideoWriter | None = None

    def add(self, frames: np.ndarray) -> dict[str, Any]:
        if self.writer is None or self.writer.bytes_written >= VIDEO_FILE_MB * 1e6:
            self.close()
            self.file += 1
            path = self.root / VIDEO_PATH.format(
                video_key=self.feature,
                chunk_index=self.file // CHUNKS_SIZE,
                file_index=self.file % CHUNKS_SIZE,
            )
            self.writer = VideoWriter(path, self.fps, self.shape[0], self.shape[1], self.vcodec)
        start = self.writer.n_frames
        self.writer.write(frames)
        v = f"videos/{self.feature}"
        return {
            f"{v}/chunk_index": self.file // CHUNKS_SIZE,
            f"{v}/file_index": self.file % CHUNKS_SIZE,
            f"{v}/from_timestamp": start / self.fps,
            f"{v}/to_timestamp": self.writer.n_frames / self.fps,
        }

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _DataFiles:
    """The frame tables: episodes appended to one parquet file, a new file past DATA_FILE_MB."""

    def __init__(self, root: Path):
        self.root, self.file, self.bytes = root, -1, 0
        self.writer = None

    def add(self, table) -> dict[str, int]:
        _, pq = _pa()
        if self.writer is None or self.bytes >= DATA_FILE_MB * 1e6:
            self.close()
            self.file += 1
            path = self.root / DATA_PATH.format(
                chunk_index=self.file // CHUNKS_SIZE, file_index=self.file % CHUNKS_SIZE
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer, self.bytes = pq.ParquetWriter(path, table.schema, compression="snappy"), 0
        self.writer.write_table(table)
        self.bytes += table.nbytes
        return {
            "data/chunk_index": self.file // CHUNKS_SIZE,
            "data/file_index": self.file % CHUNKS_SIZE,
        }

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _frame_table(
    ep: dict[str, np.ndarray],
    names: dict[str, str],
    images: list[str],
    n0: int,
    i: int,
    task: int,
    fps: int,
):
    pa, _ = _pa()
    n = len(next(iter(ep.values())))
    cols: dict[str, Any] = {}
    for key, feature in names.items():
        if key in images:
            continue
        x = ep[key].reshape(n, -1)
        x = x.astype(np.float32) if x.dtype.kind == "f" else x
        if x.shape[1] == 1:
            cols[feature] = pa.array(x[:, 0])
        else:
            cols[feature] = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    cols["timestamp"] = pa.array(np.arange(n, dtype=np.float32) / np.float32(fps))
    cols["frame_index"] = pa.array(np.arange(n, dtype=np.int64))
    cols["episode_index"] = pa.array(np.full(n, i, dtype=np.int64))
    cols["index"] = pa.array(np.arange(n0, n0 + n, dtype=np.int64))
    cols["task_index"] = pa.array(np.full(n, task, dtype=np.int64))
    return pa.table(cols)


def _feature_info(
    buf: ReplayBuffer, names: dict[str, str], images: list[str], fps: int, vcodec: str
) -> dict:
    feats: dict[str, dict] = {}
    for key, feature in names.items():
        arr = buf[key]
        if key in images:
            h, w, c = arr.shape[1:]
            info = {
                "video.height": h,
                "video.width": w,
                "video.codec": CODEC_NAMES[vcodec],
                "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False,
                "video.fps": fps,
                "video.channels": c,
                "has_audio": False,
            }
            feats[feature] = {
                "dtype": "video",
                "shape": [h, w, c],
                "names": ["height", "width", "channels"],
                "info": info,
            }
        else:
            dim = int(np.prod(arr.shape[1:]))
            dtype = "float32" if arr.dtype.kind == "f" else str(np.dtype(arr.dtype))
            feats[feature] = {"dtype": dtype, "shape": [dim], "names": None}
    for name, dtype in zip(INDEX_COLUMNS, ("float32", "int64", "int64", "int64", "int64")):
        feats[name] = {"dtype": dtype, "shape": [1], "names": None}
    return feats


def export_lerobot(
    store: str | Path,
    out: str | Path,
    fps: int | None = None,
    vcodec: str = "libsvtav1",
    task: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Write a replay-buffer store as a LeRobotDataset v3.0 directory, one episode in memory at a time.

    Built at OUT.partial and renamed when complete. `fps` defaults to the store's (a converted
    LeRobot store records it); `task` to the converted store's per-episode tasks, else "".
    """
    store, out = Path(store), Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it first or pick a new path")
    if vcodec not in CODEC_NAMES:
        raise DataError(f"unknown video codec {vcodec!r} (choose from {sorted(CODEC_NAMES)})")
    buf = ReplayBuffer.open(store, "r")
    attrs = dict(buf._group.attrs.get("lerobot", {}))
    fps = fps or attrs.get("fps")
    if not fps or int(fps) != fps or fps <= 0:
        raise DataError(f"{store}: frame rate unknown; pass --fps (a positive integer)")
    fps = int(fps)
    names, images = _export_plan(buf, attrs)
    ep_tasks = attrs.get("episode_tasks") or []
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    videos = {k: _VideoFiles(tmp, names[k], fps, buf[k].shape[1:], vcodec) for k in images}
    data, stats, tasks, episodes = _DataFiles(tmp), _Stats(), {}, []
    try:
        n0 = 0
        for i in range(buf.n_episodes):
            ep = buf.get_episode(i)
            name = task if task is not None else (ep_tasks[i] if i < len(ep_tasks) else "")
            t = tasks.setdefault(name, len(tasks))
            table = _frame_table(ep, names, images, n0, i, t, fps)
            n = table.num_rows
            row: dict[str, Any] = {"episode_index": i, "tasks": [name], "length": n}
            row.update(data.add(table))
            row.update(dataset_from_index=n0, dataset_to_index=n0 + n)
            for k in images:
                row.update(videos[k].add(ep[k]))
                stats.update(names[k], ep[k], image=True)
            for col in table.column_names:
                values = table.column(col).combine_chunks()
                if hasattr(values, "flatten"):
                    values = values.flatten()
                stats.update(col, values.to_numpy().reshape(n, -1), image=False)
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            episodes.append(row)
            n0 += n
            if progress:
                progress(i + 1, buf.n_episodes)
        data.close()
        for v in videos.values():
            v.close()
        _write_meta(tmp, buf, names, images, fps, vcodec, episodes, tasks, stats, attrs)
    except BaseException:
        data.close()
        for v in videos.values():
            try:
                v.close()
            except Exception:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    return ExportReport(out, len(episodes), n0, names)


def _write_meta(root: Path, buf, names, images, fps, vcodec, episodes, tasks, stats, attrs) -> None:
    pa, pq = _pa()
    meta = root / "meta"
    (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes), root / EPISODES_PATH)
    task_table = pa.table(
        {
            "task_index": pa.array(list(tasks.values()), pa.int64()),
            "__index_level_0__": pa.array(list(tasks), pa.large_string()),
        }
    )
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": None,
                "field_name": "__index_level_0__",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
    }
    task_table = task_table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})
    pq.write_table(task_table, meta / "tasks.parquet")
    n = len(episodes)
    info = {
        "codebase_version": "v3.0",
        "robot_type": attrs.get("robot_type"),
        "total_episodes": n,
        "total_frames": sum(e["length"] for e in episodes),
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": DATA_FILE_MB,
        "video_files_size_in_mb": VIDEO_FILE_MB,
        "fps": fps,
        "splits": {"train": f"0:{n}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if images else None,
        "features": _feature_info(buf, names, images, fps, vcodec),
    }
    (meta / "info.json").write_text(json.dumps(info, indent=4))
    (meta / "stats.json").write_text(json.dumps(stats.result(), indent=4))
