"""Record (observation, action) pairs on the robot into a replay-buffer store; numpy and zarr only.

    from diffusion_policy.serving.recorder import EpisodeRecorder

    with EpisodeRecorder("demos.zarr") as rec:          # created at the first committed episode
        for episode in range(n):
            for t in range(steps):
                obs = {"front": cam0(), "wrist": cam1(), "eef_pos": arm.pose()}
                action = teleop.read()
                rec.add(obs, action)                     # the obs before the action, as Push-T's stores
                robot.command(action)
            rec.end_episode() if operator_says_keep() else rec.discard_episode()

The store is the replay-buffer layout (`data/<obs key>`, `data/action`, `meta/episode_ends`) that
`dp data info` and `dp train` read. Leaving the `with` block normally commits an unfinished episode;
leaving it by an exception discards it.

Crash safety: an episode is buffered in memory and committed as a whole. The commit writes the new
chunks beyond every array's stored length (invisible to readers), then grows the data arrays, then
meta/episode_ends, whose one metadata write is the commit point (replay_buffer.add_episode does it in
that order; zarr writes every file through a temporary name and a rename). A kill mid-episode leaves
the store as it was; a kill mid-commit can leave frames beyond the last episode end and zarr temp
files, which `recover()` removes, as the next `EpisodeRecorder` on the store does first. The very
first episode is written to a temporary store that is renamed into place, so a store never exists
without a committed episode. One recorder writes a store at a time (a lock file beside it).

Every key's per-frame shape and dtype are fixed by the store (or, for a new store, by the first
frame); a frame that disagrees, or has NaN/Inf, is refused with one line naming the key and step, and
the episode so far is kept.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr

from diffusion_policy.data.replay_buffer import ReplayBuffer, _check_ends, _check_values
from diffusion_policy.errors import DataError

# zarr's LocalStore writes each file as "<name>.<uuid4 hex>.partial" and renames it into place
_ZARR_TEMP = re.compile(r".*\.[0-9a-f]{32}\.partial")

Spec = dict[str, tuple[tuple[int, ...], np.dtype]]


def recover(path: str | os.PathLike) -> list[str]:
    """Undo what an interrupted commit left in a store: zarr temp files, and frames of data arrays
    beyond the last committed episode end. Returns what it changed, one line each (empty: nothing)."""
    p = Path(path)
    changed = []
    for d, _, files in os.walk(p):
        for f in files:
            if _ZARR_TEMP.fullmatch(f):
                (Path(d) / f).unlink()
                changed.append(f"removed unfinished write {Path(d, f).relative_to(p)}")
    try:
        g = zarr.open_group(str(p), mode="a")
        ends = np.asarray(g["meta/episode_ends"][:])
        arrays = list(g["data"].arrays())
    except Exception as e:  # not a store the recorder wrote: let ReplayBuffer.open name the problem
        changed.append(f"not repaired ({type(e).__name__}: {e})")
        return changed
    if _check_ends(p, ends):  # damage no commit of ours leaves: truncating to it could lose data
        changed.append("not repaired (meta/episode_ends is damaged; run `dp data validate`)")
        return changed
    n = int(ends[-1]) if ends.size else 0
    for name, arr in arrays:
        if arr.shape[0] > n:
            changed.append(f"data/{name}: dropped {arr.shape[0] - n} uncommitted frame(s)")
            arr.resize((n, *arr.shape[1:]))
    return changed


def _lock(path: Path) -> Any:
    """An exclusive lock on `.<name>.lock` beside the store, released by the OS if we die."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, one writer is the caller's promise
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path.parent / f".{path.name}.lock", "a")  # noqa: SIM115 (held until close)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise DataError(f"{path}: another recorder is writing this store") from None
    return fh


def _spec_of(frame: Mapping[str, np.ndarray]) -> Spec:
    return {k: (tuple(v.shape), v.dtype) for k, v in frame.items()}


class EpisodeRecorder:
    """Append whole episodes of (observation, action) to a replay-buffer store, crash-safely."""

    def __init__(self, path: str | os.PathLike, action_key: str = "action"):
        self.path = Path(path)
        self.action_key = action_key
        self._lock = _lock(self.path)
        self._buf: ReplayBuffer | None = None
        self._store_spec: Spec = {}
        self._frames: list[dict[str, np.ndarray]] = []
        for stale in self.path.parent.glob(f".{self.path.name}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)  # a first commit that was killed
        self.recovered: list[str] = []  # what recover() repaired on opening, one line each
        if self.path.exists():
            try:
                self.recovered = recover(self.path)
                self._buf = ReplayBuffer.open(self.path, "a")
            except BaseException:
                self.close()
                raise
            self._store_spec = {
                k: (tuple(self._buf[k].shape[1:]), np.dtype(self._buf[k].dtype))
                for k in self._buf.keys()
            }
            if self._store_spec and action_key not in self._store_spec:
                self.close()
                raise DataError(f"{self.path}: has no data/{action_key} (have: {', '.join(self._store_spec)})")  # fmt: skip

    # ------------------------------------------------------------ recording
    @property
    def n_episodes(self) -> int:
        """Committed episodes in the store."""
        return self._buf.n_episodes if self._buf is not None else 0

    @property
    def n_pending(self) -> int:
        """Frames of the episode being recorded (not yet committed)."""
        return len(self._frames)

    def add(self, obs: Mapping[str, Any], action: Any) -> None:
        """Buffer one control step: the observation the action was chosen from, and the action."""
        if not isinstance(obs, Mapping):
            raise DataError(f"obs must be a dict of arrays, got {type(obs).__name__}")
        if self.action_key in obs:
            raise DataError(f"obs key {self.action_key!r} clashes with the action key")
        frame = {str(k): np.array(v) for k, v in obs.items()}  # a copy: robots reuse buffers
        frame[self.action_key] = np.array(action)
        self._check(frame)
        self._frames.append(frame)

    def _check(self, frame: dict[str, np.ndarray]) -> None:
        step = len(self._frames)
        spec = self._store_spec or (_spec_of(self._frames[0]) if self._frames else _spec_of(frame))
        whose = "the store" if self._store_spec else "this episode's first step"
        if set(frame) != set(spec):
            raise DataError(
                f"step {step}: keys {sorted(frame)} differ from {whose}'s {sorted(spec)}"
            )
        for k, v in frame.items():
            if not k or "/" in k or k.startswith("."):
                raise DataError(f"step {step}: key {k!r} cannot name a store array")
            if v.dtype.kind not in "biuf":
                raise DataError(f"step {step}: {k}: dtype {v.dtype} is not numeric")
            if (v.shape, v.dtype) != spec[k]:
                shape, dtype = spec[k]
                raise DataError(
                    f"step {step}: {k}: shape {v.shape} {v.dtype}, but {whose} has {shape} {dtype}"
                )
            problem = _check_values(f"step {step}", k, v.reshape(1, *v.shape), step)
            if problem:
                raise DataError(problem)

    def end_episode(self) -> int | None:
        """Commit the buffered episode; returns its index in the store (None if it had no frames)."""
        if not self._frames:
            return None
        episode = {k: np.stack([f[k] for f in self._frames]) for k in self._frames[0]}
        if self._buf is None:
            self._buf = self._create(episode)
            self._store_spec = {k: (v.shape[1:], v.dtype) for k, v in episode.items()}
        else:
            self._buf.add_episode(episode)
        self._frames = []
        return self._buf.n_episodes - 1

    def _create(self, episode: dict[str, np.ndarray]) -> ReplayBuffer:
        """The store with its first episode, built under a temporary name and renamed into place."""
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent))  # fmt: skip
        try:
            staged = ReplayBuffer.create(tmp / "store.zarr")
            staged.add_episode(episode)
            (tmp / "store.zarr").rename(self.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return ReplayBuffer.open(self.path, "a")

    def discard_episode(self) -> int:
        """Drop the buffered episode; returns how many frames were dropped."""
        n, self._frames = len(self._frames), []
        return n

    def close(self) -> None:
        """Release the store; an episode not committed with end_episode() is discarded."""
        self._frames = []
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> EpisodeRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.end_episode()
        finally:
            self.close()
