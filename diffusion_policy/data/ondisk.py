"""Stores larger than memory: camera frames read per batch from the zarr chunks, ahead of the step.

`DiskFrames` reads the rgb keys of a task spec for given frame indices: each needed chunk is read
and decoded once per batch (zarr's orthogonal selection over the sorted unique indices; our image
chunks are time-only, ~2 MB: 9 frames of 240x320x3), optionally through a small LRU of decoded
chunks. Low-dim keys and the action are not read here: they are a few bytes per frame (56 of the
460,856 per frame of a two-camera 240x320 store), the normaliser needs all of them anyway, and
read whole they keep every value check of the resident path; datasets.OnDiskDataset holds them.

`Prefetcher` reads the batches of the next steps in a background thread while the current step
runs. It knows the step's batch from the schedule (a function step -> indices: training/build.py's
`batch_indices` of (seed, step)), so the loop keeps calling `get_batch(idx)` unchanged; a call whose
indices are not the ones expected (validation, a resumed run's first step) is read directly, and
the schedule is re-found with `locate`. Why a thread and not DataLoader workers: the thread takes
no core from the training step and returns the batch without pickling or a copy through shared
memory, at half the memory; but zarr's per-chunk work mostly holds the GIL, so a second thread adds
nothing, and on an idle machine two worker processes read ~1.6x faster (scripts/bench_ondisk.py
measures the three side by side).

`residency` is `data.resident` resolved: auto keeps every frame on the training device when the
frames the spec reads take at most RESIDENT_FRACTION of the memory available (host RAM, and the
GPU's free memory on CUDA), in host RAM when only the host has room, else on disk.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.data.task_spec import TaskSpec, check_spec
from diffusion_policy.errors import ConfigError, DataError

RESIDENT_FRACTION = 0.5  # auto: resident while the frames take at most this share of free memory
RESIDENCIES = ("device", "host", "disk")


# ---------------------------------------------------------------------------------------------- choice
def frames_nbytes(buffer: ReplayBuffer, spec: TaskSpec) -> int:
    """Bytes the resident path holds for this spec: uint8 rgb frames, float32 low-dim and action."""
    shapes = check_spec(buffer, spec)
    per_frame = sum(
        math.prod(s) * (1 if spec.keys()[k].kind == "rgb" else 4) for k, s in shapes.items()
    )
    return per_frame * buffer.n_steps


def host_available() -> int:
    """MemAvailable from /proc/meminfo (bytes): free RAM plus what the page cache can give back."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def residency(setting: bool | str, nbytes: int, device: str) -> tuple[str, str]:
    """(device | host | disk, why) for data.resident = true | false | disk | auto."""
    if setting is True:
        return "device", "data.resident=true"
    if setting is False:
        return "host", "data.resident=false"
    if setting == "disk":
        return "disk", "data.resident=disk"
    if setting != "auto":
        raise ConfigError(f"data.resident={setting!r}: expected auto, true, false or disk")
    host = host_available()
    gb = f"{nbytes / 1e9:.2f} GB of frames"
    if nbytes > RESIDENT_FRACTION * host:
        return "disk", f"{gb} > {RESIDENT_FRACTION:.0%} of {host / 1e9:.1f} GB available RAM"
    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        if nbytes > RESIDENT_FRACTION * free:
            return "host", f"{gb} > {RESIDENT_FRACTION:.0%} of {free / 1e9:.1f} GB free on {device}"
    return "device", f"{gb} fit"


# ---------------------------------------------------------------------------------------------- reading
class _ChunkCache:
    """Decoded chunks (chunk index -> rows), least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        with self._lock:
            rows = self._chunks.get(key)
            if rows is not None:
                self._chunks.move_to_end(key)
            return rows

    def put(self, key: tuple[str, int], rows: np.ndarray) -> None:
        with self._lock:
            self._chunks[key] = rows
            self.nbytes += rows.nbytes
            while self.nbytes > self.max_bytes and self._chunks:
                self.nbytes -= self._chunks.popitem(last=False)[1].nbytes


class DiskFrames:
    """The rgb keys of a spec, read from the store's chunks for given frame indices."""

    def __init__(self, buffer: ReplayBuffer, spec: TaskSpec, cache_mb: int = 0):
        shapes = check_spec(buffer, spec)
        if spec.reader is not None and any(k.kind == "rgb" for k in spec.obs.values()):
            raise ConfigError(
                f"{spec.label}: its frames come from a format reader, which the on-disk path "
                "cannot apply per batch; set data.resident=true or false"
            )
        self.path = buffer.path or "<memory>"
        self.keys = {name: k for name, k in spec.obs.items() if k.kind == "rgb"}
        self.shapes = {name: shapes[name] for name in self.keys}
        self._arrays = {name: buffer[k.sources[0].key] for name, k in self.keys.items()}
        self._cache = _ChunkCache(cache_mb * 2**20) if cache_mb > 0 else None

    def placeholders(self) -> dict[str, np.ndarray]:
        """Zero-length arrays of each rgb key's frame shape (what shape_meta reads)."""
        return {name: np.empty((0, *s), dtype=np.uint8) for name, s in self.shapes.items()}

    def read(self, name: str, t: np.ndarray) -> np.ndarray:
        """uint8 frames (len(t), H, W, 3) of rgb key `name` at absolute frame indices t."""
        u, inverse = np.unique(np.asarray(t).reshape(-1), return_inverse=True)
        rows = self._rows(name, u) if self._cache is None else self._cached_rows(name, u)
        return self._uint8(name, rows)[inverse]

    def _rows(self, name: str, u: np.ndarray) -> np.ndarray:
        """Rows u (sorted, unique): zarr reads and decodes each chunk they touch once."""
        try:
            return np.asarray(self._arrays[name].get_orthogonal_selection((u,)))
        except Exception as e:  # codec / store errors: one line naming the key
            key = self.keys[name].sources[0].key
            raise DataError(
                f"{self.path}: data/{key}: cannot read frames {u[0]}..{u[-1]} ({type(e).__name__}: {e})"
            ) from e

    def _cached_rows(self, name: str, u: np.ndarray) -> np.ndarray:
        arr = self._arrays[name]
        c, n = int(arr.chunks[0]), int(arr.shape[0])
        ids = np.unique(u // c)
        chunks = {int(i): self._cache.get((name, int(i))) for i in ids}
        missing = [i for i, rows in chunks.items() if rows is None]
        if missing:
            spans = [np.arange(i * c, min(n, (i + 1) * c)) for i in missing]
            rows = self._rows(name, np.concatenate(spans))
            for i, span in zip(missing, np.split(rows, np.cumsum([len(s) for s in spans])[:-1])):
                chunks[i] = span
                self._cache.put((name, i), span)
        return np.stack([chunks[int(f // c)][f % c] for f in u])

    def _uint8(self, name: str, rows: np.ndarray) -> np.ndarray:
        """uint8 as stored; float 0..255 frames (Push-T's human set) rounded as the resident path."""
        if rows.dtype == np.uint8:
            return rows
        if rows.size and not (np.isfinite(rows).all() and rows.min() >= 0 and rows.max() <= 255):
            key = self.keys[name].sources[0].key
            raise DataError(f"{self.path}: data/{key}: values outside 0..255 in a batch's frames")
        out = np.empty(rows.shape, dtype=np.uint8)
        out[...] = np.rint(rows)
        return out


# ---------------------------------------------------------------------------------------------- prefetching
class Prefetcher:
    """The batches of the next `depth` steps of a schedule, read in one background thread."""

    def __init__(
        self,
        load: Callable[[np.ndarray], dict[str, Any]],
        indices_at: Callable[[int], torch.Tensor],
        depth: int = 2,
        locate: Callable[[np.ndarray], int | None] | None = None,
        threads: int = 1,
    ):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.load, self.indices_at, self.depth, self.locate = load, indices_at, depth, locate
        self.hits = self.misses = 0
        self._next: int | None = None  # the step whose batch is expected next
        self._pending: deque[tuple[np.ndarray, Future]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dp-prefetch")

    def get(self, idx: np.ndarray) -> dict[str, Any]:
        """The batch of indices `idx`: prefetched when it is the expected step's, else read now."""
        if self._pending and np.array_equal(self._pending[0][0], idx):
            _, future = self._pending.popleft()
            self._next += 1
            self._fill()
            self.hits += 1
            return future.result()
        self.misses += 1
        if (
            self._next is None
        ):  # not following yet: which step is this? (without locate: step 0 only)
            first = lambda i: 0 if np.array_equal(self.indices_at(0).cpu().numpy(), i) else None  # noqa: E731
            step = (self.locate or first)(idx)
            if step is not None:
                self._next = step + 1
                self._fill()
        return self.load(idx)

    def _fill(self) -> None:
        while len(self._pending) < self.depth:
            step = self._next + len(self._pending)
            idx = self.indices_at(step).cpu().numpy()
            self._pending.append((idx, self._pool.submit(self.load, idx)))

    def close(self) -> None:
        for _, f in self._pending:
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
