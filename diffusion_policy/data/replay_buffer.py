"""Episodes of demonstrations in one zarr store: `data/<key>` concatenated over time + `meta/episode_ends`.

This is the layout of the original Diffusion Policy code (and of the published Push-T data), so its
stores open here unchanged. Arrays hold every episode back to back along axis 0; `episode_ends[i]`
is the exclusive end of episode i, so episode i is `[ends[i-1], ends[i])` with `ends[-1] = 0`.

Two backends, one class:
  * `ReplayBuffer.load(path, keys)` copies the arrays into RAM (numpy dict). Training uses this: the
    Push-T store is small, and random access into compressed chunks would dominate the step time.
  * `ReplayBuffer.open(path, mode)` keeps zarr arrays on disk; `mode="a"` appends episodes in place,
    which is how generated or recorded demonstrations are written one episode at a time.
  * `ReplayBuffer.create_empty()` + `save(path)` builds a store in RAM and writes it once.

Reading never writes: stores are opened read-only. Bad stores raise `DataError` naming path and key.
One hazard we guard against explicitly: a truncated Blosc chunk decodes *without error* into garbage
under numcodecs, so we check every chunk file's Blosc header against its size, and new (zarr v3)
stores carry a crc32c checksum per chunk that zarr verifies on every read.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import zarr

from diffusion_policy.errors import DataError

CHUNK_BYTES = 2_000_000  # ~2 MB chunks, as in the original (see PUSHT_SPEC.md §2.1)
EPISODE_ENDS_CHUNK = 4096  # 32 KB of int64; appending never rechunks
_META_FILES = {".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json"}
# Value checks on every read (see _check_values, _check_outliers): corrupt chunks must not train silently.
PLAUSIBLE_ABS = 1e6  # no low-dim value or action of any robot is this large (px, mm, rad, counts)
OUTLIER_FACTOR = 1000.0  # robust ranges from the median beyond which one value is taken as corrupt
LOW_DIM_MAX = 1024  # values per frame up to which an array is low-dim and gets the outlier check


def get_optimal_chunks(
    shape: Sequence[int], itemsize: int, target_bytes: int = CHUNK_BYTES
) -> tuple[int, ...]:
    """Time-only chunks of about `target_bytes`: trailing dims kept whole while they fit, others 1.

    Chunking along time only means an episode (or a window) is a few contiguous chunks, and per-frame
    layout is what both appending and sequential loading want. Unlike the original we do not cap the
    time chunk at the first episode's length: that made low-dim arrays ~160-frame (3 KB) chunks.
    """
    shape = tuple(int(s) for s in shape)
    chunks = list(shape)
    item_bytes = itemsize
    for i in range(len(shape) - 1, -1, -1):  # walk dims from last to first
        n = shape[i] if i > 0 or shape[0] > 0 else 2**62  # an empty time axis grows later
        if i == 0 or item_bytes * n > target_bytes:
            # dim i is the split: as many of its entries as fit the target; leading dims get 1
            chunks[i] = max(1, min(n, math.ceil(target_bytes / item_bytes)))
            chunks[:i] = [1] * i
            break
        item_bytes *= n
    return tuple(chunks)


def _codecs(zarr_format: int) -> dict:
    """Blosc zstd (bitshuffle) for both formats; v3 adds a crc32c so a damaged chunk fails loudly."""
    if zarr_format == 2:
        import numcodecs

        return {
            "compressors": numcodecs.Blosc(
                cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE
            )
        }
    from zarr.codecs import BloscCodec, Crc32cCodec

    return {
        "compressors": (BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec())
    }


def _check_dtype(path: object, key: str, dtype: np.dtype) -> str | None:
    if key == "meta/episode_ends":
        if dtype.kind not in "iu":
            return f"{path}: {key}: dtype {dtype} is not an integer type"
        return None
    if dtype.kind not in "biuf":
        return f"{path}: {key}: dtype {dtype} is not numeric (bool, int, uint or float)"
    return None


def _check_ends(path: object, ends: np.ndarray) -> list[str]:
    problems = []
    if ends.ndim != 1:
        return [f"{path}: meta/episode_ends: shape {ends.shape} is not 1-D"]
    if ends.size and ends[0] <= 0:
        problems.append(f"{path}: meta/episode_ends: episode 0 is empty (ends[0] = {ends[0]})")
    bad = np.flatnonzero(np.diff(ends) <= 0)
    if bad.size:
        i = int(bad[0]) + 1
        problems.append(
            f"{path}: meta/episode_ends: not strictly increasing at episode {i} "
            f"({ends[i - 1]} -> {ends[i]}; {bad.size} place(s))"
        )
    return problems


def _check_values(path: object, key: str, x: np.ndarray, offset: int = 0) -> str | None:
    """NaN/Inf, or a magnitude no robot's data has (|x| > PLAUSIBLE_ABS): decoded garbage or a dtype
    that does not match the bytes (a float32 chunk read as int32 gives about 1e9). Two reductions;
    the element-wise scan runs only when they fail."""
    if x.dtype.kind not in "iuf" or x.size == 0 or (x.dtype.kind in "iu" and x.dtype.itemsize < 4):
        return None  # bool and (u)int8/16 cannot exceed the bound
    lo, hi = x.min(), x.max()
    if -PLAUSIBLE_ABS <= lo and hi <= PLAUSIBLE_ABS:  # False for NaN as well
        return None
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = ~np.isfinite(x)
        first = offset + int(np.argwhere(bad)[0][0])
        return f"{path}: data/{key}: {int(bad.sum())} NaN/Inf value(s), first at frame {first}"
    big = np.abs(x.astype(np.float64)) > PLAUSIBLE_ABS
    where = np.argwhere(big)[0]
    return (
        f"{path}: data/{key}: {int(big.sum())} value(s) beyond ±{PLAUSIBLE_ABS:.0e}, first "
        f"{float(x[tuple(where)]):.3g} at frame {offset + int(where[0])} "
        "(a corrupt chunk, or a dtype that does not match the stored bytes)"
    )


def _check_outliers(path: object, key: str, x: np.ndarray) -> str | None:
    """A low-dim value OUTLIER_FACTOR robust ranges (1st..99th percentile, at least |median| and 1)
    away from its dimension's median: one corrupt value among plausible ones."""
    if x.dtype.kind not in "iuf" or len(x) < 2 or math.prod(x.shape[1:]) > LOW_DIM_MAX:
        return None
    flat = x.reshape(len(x), -1).astype(np.float64)
    lo, med, hi = np.percentile(flat, [1.0, 50.0, 99.0], axis=0)
    scale = np.maximum(np.maximum(hi - lo, np.abs(med)), 1.0)
    far = np.abs(flat - med) > OUTLIER_FACTOR * scale
    if not far.any():
        return None
    t, d = (int(v) for v in np.argwhere(far)[0])
    return (
        f"{path}: data/{key}: {int(far.sum())} implausible value(s), first {flat[t, d]:.3g} at frame "
        f"{t} (dim {d}; the data's 1..99th percentile range is {lo[d]:.3g}..{hi[d]:.3g})"
    )


def _blosc_last(arr: zarr.Array) -> bool:
    """True when the bytes on disk are exactly one Blosc frame (so its header gives the file size)."""
    md = arr.metadata
    if md.zarr_format == 2:
        comp = md.compressor
        return comp is not None and getattr(comp, "codec_id", "") == "blosc" and not md.filters
    codecs = md.codecs
    return len(codecs) >= 2 and type(codecs[-1]).__name__ == "BloscCodec"


def _n_chunk_files(arr: zarr.Array) -> int:
    """Files a fully written array has: one per chunk, or one per shard (zarr 3's sharding codec packs
    many chunks into one file, whose index zarr checks with its own crc32c on every read)."""
    grid = arr.shards or arr.chunks
    return math.prod(math.ceil(n / c) for n, c in zip(arr.shape, grid))


def _chunk_file_problems(root: Path, key: str, arr: zarr.Array) -> list[str]:
    """Missing chunk files, and Blosc chunks whose header size disagrees with the file (truncation).

    Costs one directory walk and a 16-byte read per chunk; the data itself is not decoded.
    """
    adir = root / arr.path
    files = [Path(d) / f for d, _, fs in os.walk(adir) for f in fs if f not in _META_FILES]
    problems = []
    n_files, what = _n_chunk_files(arr), "shard" if arr.shards else "chunk"
    if arr.size and len(files) < n_files:
        problems.append(
            f"{root}: {key}: {n_files - len(files)} of {n_files} {what} files missing "
            "(deleted, or never written because all values equal fill_value)"
        )
    if _blosc_last(arr):
        for f in sorted(files):
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(16)
            cbytes = struct.unpack("<I", head[12:16])[0] if len(head) == 16 else -1
            if cbytes != size:
                rel = f.relative_to(root)
                problems.append(
                    f"{root}: {key}: chunk file {rel} is truncated or corrupt ({size} bytes, Blosc header says {cbytes})"
                )
    return problems


def _open_group(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such dataset store (fetch one with `dp data fetch pusht`)")
    try:
        return zarr.open_group(str(p), mode=mode)
    except Exception as e:  # zarr raises several types for a non-store directory
        raise DataError(f"{p}: not a readable zarr store ({type(e).__name__}: {e})") from e


def _read(path: object, key: str, arr: zarr.Array, sel: slice | tuple = slice(None)) -> np.ndarray:
    try:
        return np.asarray(arr[sel])
    except Exception as e:  # codec / store errors: re-raise as a one-line data error
        raise DataError(f"{path}: {key}: cannot read chunk data ({type(e).__name__}: {e})") from e


class ReplayBuffer:
    """Episodes stored as `data[key]` (N, ...) arrays concatenated over time plus `episode_ends` (E,)."""

    def __init__(
        self,
        data: dict[str, np.ndarray | zarr.Array],
        episode_ends: np.ndarray | zarr.Array,
        path: Path | None = None,
        group: zarr.Group | None = None,
    ):
        self._data = data
        self._ends = episode_ends
        self.path = path
        self._group = group

    # ---------------------------------------------------------------- construction
    @classmethod
    def create_empty(cls) -> ReplayBuffer:
        """An empty in-memory buffer; fill it with `add_episode` and write it with `save`."""
        return cls({}, np.zeros((0,), dtype=np.int64))

    @classmethod
    def create(cls, path: str | os.PathLike, zarr_format: int = 3) -> ReplayBuffer:
        """A new, empty on-disk store (refuses to overwrite) that `add_episode` appends to."""
        p = Path(path)
        if p.exists():
            raise DataError(
                f"{p}: already exists; open it with mode='a' to append, or pick a new path"
            )
        g = zarr.open_group(str(p), mode="w-", zarr_format=zarr_format)
        g.create_group("data")
        ends = g.require_group("meta").create_array(
            "episode_ends",
            shape=(0,),
            chunks=(EPISODE_ENDS_CHUNK,),
            dtype="int64",
            fill_value=0,
            config={"write_empty_chunks": True},
            **_codecs(zarr_format),
        )
        return cls({}, ends, path=p, group=g)

    @classmethod
    def open(
        cls, path: str | os.PathLike, mode: str = "r", keys: Sequence[str] | None = None
    ) -> ReplayBuffer:
        """Zarr-backed buffer on disk. `mode="r"` never writes; `mode="a"` appends episodes.

        Checks dtypes, lengths and episode_ends, and the chunk files of `keys` (default: all) for
        truncation, without decoding any data.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        p = Path(path)
        g = _open_group(p, mode)
        data, ends = _members(p, g)
        if (
            mode == "a"
        ):  # every chunk file written, even all-zero ones: validate treats a missing file as damage
            data = {k: v.with_config({"write_empty_chunks": True}) for k, v in data.items()}
            ends = ends.with_config({"write_empty_chunks": True})
        buf = cls(data, ends, path=p, group=g)
        for k in keys or ():
            buf[k]  # raises DataError naming the missing key
        buf._check_structure(chunk_keys=list(data) if keys is None else list(keys))
        return buf

    @classmethod
    def load(cls, path: str | os.PathLike, keys: Sequence[str] | None = None) -> ReplayBuffer:
        """Copy `keys` (default: all) into RAM, checking chunk files, lengths, dtypes and NaN/Inf."""
        p = Path(path)
        g = _open_group(p, "r")
        data, ends = _members(p, g)
        keys = list(data) if keys is None else list(keys)
        for k in keys:
            if k not in data:
                raise DataError(f"{p}: missing key data/{k} (have: {', '.join(data)})")
        src = cls(data, ends, path=p, group=g)
        src._check_structure(chunk_keys=keys)  # only the chunk files of keys we read
        data = {k: src.read(k) for k in keys}
        return cls(data, np.asarray(src._ends[:], dtype=np.int64), path=src.path)

    # ---------------------------------------------------------------- properties
    @property
    def backend(self) -> str:
        return "zarr" if self._group is not None else "numpy"

    @property
    def episode_ends(self) -> np.ndarray:
        return np.asarray(self._ends[:], dtype=np.int64)

    @property
    def n_episodes(self) -> int:
        return int(self._ends.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self._ends[-1]) if self.n_episodes else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0)

    def keys(self) -> list[str]:
        return list(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __getitem__(self, key: str) -> np.ndarray | zarr.Array:
        """The raw array (numpy, or zarr on disk). Use `read` for a checked numpy copy."""
        if key not in self._data:
            raise DataError(
                f"{self.path or '<memory>'}: missing key data/{key} (have: {', '.join(self.keys())})"
            )
        return self._data[key]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self._data.items())
        return f"ReplayBuffer({self.backend}, {self.n_episodes} episodes, {self.n_steps} steps; {shapes})"

    # ---------------------------------------------------------------- reading
    def episode_slice(self, i: int) -> slice:
        n = self.n_episodes
        if not -n <= i < n:
            raise IndexError(f"episode {i} out of range ({n} episodes)")
        i %= n
        start = int(self._ends[i - 1]) if i > 0 else 0
        return slice(start, int(self._ends[i]))

    def get_episode(self, i: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        s = self.episode_slice(i)
        return {k: self.read(k, s) for k in (keys or self.keys())}

    def iter_episodes(self, keys: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.n_episodes):
            yield self.get_episode(i, keys)

    def iter_blocks(
        self, key: str, max_bytes: int = 256_000_000
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start, block) pieces of one array, chunk-aligned, so a big key converts without a full copy."""
        arr = self[key]
        n = arr.shape[0]
        step = max(1, max_bytes // max(1, arr.dtype.itemsize * math.prod(arr.shape[1:])))
        if isinstance(arr, zarr.Array):
            c = arr.chunks[0]
            step = max(c, step // c * c)
        for start in range(0, n, step):
            yield start, self.read(key, slice(start, min(n, start + step)))

    def read(self, key: str, sel: slice = slice(None)) -> np.ndarray:
        """A numpy copy (or view, numpy backend) of `data[key][sel]`, checked for NaN/Inf and absurd
        magnitudes; a whole low-dim array is also checked for outliers against its own robust range."""
        arr = self[key]
        x = _read(self.path, f"data/{key}", arr, sel) if isinstance(arr, zarr.Array) else arr[sel]
        start = (sel.start or 0) if isinstance(sel, slice) else 0
        where = self.path or "<memory>"
        problem = _check_values(where, key, x, start)
        if problem is None and sel == slice(None):
            problem = _check_outliers(where, key, x)
        if problem:
            raise DataError(problem)
        return x

    def _check_structure(self, chunk_keys: Sequence[str] = ()) -> None:
        """Cheap checks (no decoding): dtypes, lengths, ends order, chunk files. Raise the first problem."""
        problems = _structure_problems(self.path, self._group, self._data, self._ends, chunk_keys)
        if problems:
            raise DataError(
                problems[0]
                + (
                    f" (and {len(problems) - 1} more; run `dp data validate`)"
                    if len(problems) > 1
                    else ""
                )
            )

    # ---------------------------------------------------------------- writing
    def add_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        """Append one episode: every key (the same keys as earlier episodes) with the same length L > 0."""
        where = self.path or "<memory>"
        if self._group is not None and self._group.read_only:
            raise DataError(
                f"{where}: opened read-only; use ReplayBuffer.open(path, mode='a') to append"
            )
        ep = {k: np.asarray(v) for k, v in episode.items()}
        if not ep:
            raise DataError(f"{where}: add_episode got no arrays")
        lengths = {k: v.shape[0] if v.ndim else 0 for k, v in ep.items()}
        L = next(iter(lengths.values()))
        if L == 0 or any(n != L for n in lengths.values()):
            raise DataError(f"{where}: episode arrays must share one length > 0, got {lengths}")
        if self._data and set(ep) != set(self._data):
            raise DataError(
                f"{where}: episode keys {sorted(ep)} differ from the store's {sorted(self._data)}"
            )
        for k, v in ep.items():
            problem = _check_dtype(where, f"data/{k}", v.dtype) or _check_values(
                where, k, v, self.n_steps
            )
            if problem:
                raise DataError(problem)
            if k in self._data:
                arr = self._data[k]
                if tuple(arr.shape[1:]) != v.shape[1:] or np.dtype(arr.dtype) != v.dtype:
                    raise DataError(
                        f"{where}: data/{k}: episode has {v.shape[1:]} {v.dtype}, store has {tuple(arr.shape[1:])} {arr.dtype}"
                    )
        n0, n1 = self.n_steps, self.n_steps + L
        if self._group is None:
            for k, v in ep.items():
                self._data[k] = (
                    v.copy() if k not in self._data else np.concatenate([self._data[k], v])
                )
            self._ends = np.append(self._ends, np.int64(n1))
            return
        fmt = self._group.metadata.zarr_format
        for k, v in ep.items():
            if k not in self._data:
                self._data[k] = self._group["data"].create_array(
                    k,
                    shape=(0, *v.shape[1:]),
                    dtype=v.dtype,
                    fill_value=0,
                    chunks=get_optimal_chunks((0, *v.shape[1:]), v.dtype.itemsize),
                    config={"write_empty_chunks": True},
                    **_codecs(fmt),
                )
            _write_beyond(self._data[k], n0, v)  # chunks only: readers still see n0 frames
        for k, v in ep.items():
            self._data[k].resize((n1, *v.shape[1:]))
        # episode_ends last, its value written before its shape grows: that one metadata write is the
        # commit point. A crash before it leaves data longer than ends (validate reports it;
        # serving/recorder.py's recover() truncates it), never an episode_ends entry without a value.
        _write_beyond(self._ends, self.n_episodes, np.array([n1], dtype=np.int64))
        self._ends.resize((self.n_episodes + 1,))

    def save(self, path: str | os.PathLike, zarr_format: int = 3) -> Path:
        """Write the whole buffer as a new store (refuses to overwrite); returns the path."""
        p = Path(path)
        if p.exists():
            raise DataError(f"{p}: already exists; remove it first or pick a new path")
        g = zarr.open_group(str(p), mode="w-", zarr_format=zarr_format)
        cfg = {"write_empty_chunks": True}
        data = g.create_group("data")
        for k in self.keys():
            x = self.read(k)
            a = data.create_array(
                k,
                shape=x.shape,
                dtype=x.dtype,
                fill_value=0,
                config=cfg,
                chunks=get_optimal_chunks(x.shape, x.dtype.itemsize),
                **_codecs(zarr_format),
            )
            a[...] = x
        ends = self.episode_ends
        e = g.create_group("meta").create_array(
            "episode_ends",
            shape=ends.shape,
            dtype="int64",
            fill_value=0,
            config=cfg,
            chunks=(max(1, min(EPISODE_ENDS_CHUNK, ends.size)),),
            **_codecs(zarr_format),
        )
        e[...] = ends
        return p


def _write_beyond(arr: zarr.Array, start: int, values: np.ndarray) -> None:
    """Write rows start.. of `arr` without saving its new shape: only chunk files change (each one
    replaced atomically by zarr's LocalStore), so a reader, or a crash, still sees the old length."""
    shape = (start + len(values), *arr.shape[1:])
    wider = zarr.Array(
        zarr.AsyncArray(arr.metadata.update_shape(shape), arr.store_path, arr.config)
    )
    wider[start:] = values


def _node(path: Path, g: zarr.Group, key: str) -> zarr.Array | zarr.Group:
    """One member, opened on its own: a bad .zarray is one DataError naming the key (never several
    concurrent zarr tasks whose exceptions asyncio would print as "Task exception was never retrieved")."""
    try:
        return g[key]
    except KeyError:
        raise
    except Exception as e:  # metadata zarr cannot parse: an unknown dtype, bad JSON, ...
        raise DataError(f"{path}: {key}: unreadable metadata ({type(e).__name__}: {e})") from e


def _members(
    path: Path, g: zarr.Group, problems: list[str] | None = None
) -> tuple[dict[str, zarr.Array], zarr.Array]:
    """data/<key> arrays (sorted by key) and meta/episode_ends. Unreadable arrays raise, or, given
    `problems`, are reported there and left out."""
    try:
        _node(path, g, "data")
    except KeyError:
        raise DataError(f"{path}: missing group data/ (not a replay-buffer store)") from None
    try:
        ends = _node(path, g, "meta/episode_ends")
    except KeyError:
        raise DataError(f"{path}: missing key meta/episode_ends") from None
    data = {}
    # One member at a time, by name: Group.arrays() opens them concurrently (see _node).
    names = sorted(d.name for d in (path / "data").iterdir() if d.is_dir())
    for name in names:
        try:
            node = _node(path, g, f"data/{name}")
        except KeyError:
            continue  # a directory that is no zarr node
        except DataError as e:
            if problems is None:
                raise
            problems.append(str(e))
            continue
        if isinstance(node, zarr.Array):
            data[name] = node
    return data, ends


def _structure_problems(
    path: Path | None,
    group: zarr.Group | None,
    data: Mapping,
    ends_arr,
    chunk_keys: Sequence[str] = (),
) -> list[str]:
    where = path or "<memory>"
    problems = []
    p = _check_dtype(where, "meta/episode_ends", np.dtype(ends_arr.dtype))
    if p:
        return [p]  # the rest is meaningless without integer ends
    try:
        ends = np.asarray(ends_arr[:])
    except Exception as e:
        return [f"{where}: meta/episode_ends: cannot read ({type(e).__name__}: {e})"]
    problems += _check_ends(where, ends)
    n = int(ends[-1]) if ends.size else 0
    for k, arr in data.items():
        p = _check_dtype(where, f"data/{k}", np.dtype(arr.dtype))
        if p:
            problems.append(p)
        if arr.shape[0] != n:
            problems.append(f"{where}: data/{k}: length {arr.shape[0]} != episode_ends[-1] = {n}")
    if group is not None and path is not None:
        if isinstance(ends_arr, zarr.Array):
            problems += _chunk_file_problems(path, "meta/episode_ends", ends_arr)
        for k in chunk_keys:
            problems += _chunk_file_problems(path, f"data/{k}", data[k])
    return problems


def validate(
    path: str | os.PathLike, visit: Callable[[str, np.ndarray], None] | None = None
) -> list[str]:
    """Every problem found in a store (empty list: valid). Decodes every chunk, so it reads all data;
    `visit(key, block)` sees each decoded block of each data key in order (to digest it on the way)."""
    p = Path(path)
    problems: list[str] = []
    try:
        g = _open_group(p, "r")
        data, ends = _members(p, g, problems)
    except DataError as e:
        return [str(e)]
    problems += _structure_problems(p, g, data, ends, chunk_keys=list(data))
    if not data and not problems:
        problems.append(f"{p}: data/ holds no arrays")
    buf = ReplayBuffer(data, ends, path=p, group=g)
    for k, arr in data.items():
        low_dim = math.prod(arr.shape[1:]) <= LOW_DIM_MAX
        try:  # a low-dim key is read whole, so its outliers are judged against all of its frames
            blocks = [(0, buf.read(k))] if low_dim else buf.iter_blocks(k)
            for _, block in blocks:
                if visit is not None:
                    visit(k, block)
        except DataError as e:
            problems.append(str(e))
    return problems
