"""Training windows of a replay-buffer store as {"obs": {key: (To, ...)}, "action": (T, Da)}, ready
for any device, for any declared task (data/task_spec.py): any number of cameras and low-dim keys.

Every frame is kept resident and a batch is gathered with one fancy-index per key (`get_batch`), on
the CPU or, after `.to("cuda")`, on the GPU with no DataLoader workers and no host-to-device copy per
step. `__getitem__` returns the same sample as numpy for inspection and for users who prefer a torch
DataLoader.

Which store keys make each policy key is the task's spec: declared in the config (`task.obs`,
`task.action`), or Push-T's `task.obs_type` shorthand (data/pusht_format.py: `pusht_spec`). Loading
checks the store against the spec first (every problem one line naming the key), then the values
(finite, plausible magnitudes: see ReplayBuffer.read).

Validation episodes (`val_episodes`):
  * "heldout" (default): only the val_ratio episodes split off by `get_val_mask` (4 on Push-T), which
    are never trained on. A clean held-out loss.
  * "complement": every episode not in the training mask (116 on Push-T), which is what the original
    validates on (PUSHT_SPEC.md §11.14). Use it to compare validation losses with the original's.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from diffusion_policy.data.ondisk import DiskFrames, Prefetcher
from diffusion_policy.data.pusht_format import pusht_spec
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.data.sampler import (
    create_windows,
    downsample_mask,
    get_val_mask,
    window_frames,
)
from diffusion_policy.data.task_spec import (
    TaskSpec,
    check_spec,
    read_frames,
    shape_meta,
    spec_from_config,
)
from diffusion_policy.errors import DataError

VAL_EPISODES = ("heldout", "complement")


def task_spec(task) -> TaskSpec:
    """The spec a TaskConfig declares: `task.obs` when given, else the Push-T `obs_type` shorthand."""
    return spec_from_config(task) if task.obs else pusht_spec(task.obs_type)


def _gather(frames: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """frames (N, ...) at indices t (B, K) -> (B, K, ...). index_select, not frames[t]: on CPU, advanced
    indexing of a (N, 96, 96, 3) uint8 tensor is ~30x slower (8 ms vs 0.25 ms for 64 x 2 images)."""
    return frames.index_select(0, t.reshape(-1)).reshape(*t.shape, *frames.shape[1:])


def _resolve(device: str | torch.device) -> torch.device:
    """`device` with its index filled in ("cuda" -> "cuda:<current>"), so `_Frames` keys match."""
    d = torch.device(device)
    return (
        torch.device("cuda", torch.cuda.current_device())
        if d.type == "cuda" and d.index is None
        else d
    )


class _Frames:
    """Frames shared by train and val views; one torch copy per device, so `.to()` never duplicates."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.numpy = arrays
        self._torch = {torch.device("cpu"): {k: torch.from_numpy(v) for k, v in arrays.items()}}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._torch:
            cpu = self._torch[torch.device("cpu")]
            self._torch[device] = {k: v.to(device) for k, v in cpu.items()}
        return self._torch[device]


class ReplayDataset:
    """Windows of a replay-buffer store, per a task spec, as {"obs": {key: (To, ...)}, "action": (T, Da)}."""

    def __init__(
        self,
        buffer: ReplayBuffer,
        spec: TaskSpec,
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
        episode_mask: np.ndarray | None = None,
    ):
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(
                f"need 1 <= n_obs_steps <= horizon, got n_obs_steps={n_obs_steps}, horizon={horizon}"
            )
        if n_action_steps < 1:
            raise ValueError(f"n_action_steps must be >= 1, got {n_action_steps}")
        self.spec = spec
        self.horizon = int(horizon)
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        frames = self._read_frames(buffer, spec)
        self._frames = _Frames(frames)
        self.shape_meta = shape_meta(spec, frames)
        self.episode_ends = buffer.episode_ends
        self._device = torch.device("cpu")
        self._set_mask(episode_mask)

    def _read_frames(self, buffer: ReplayBuffer, spec: TaskSpec) -> dict[str, np.ndarray]:
        """The frames this dataset keeps in memory: every key's, here."""
        return read_frames(buffer, spec)

    def _set_mask(self, episode_mask: np.ndarray | None) -> None:
        n = len(self.episode_ends)
        self.episode_mask = (
            np.ones(n, dtype=bool) if episode_mask is None else np.asarray(episode_mask, dtype=bool)
        )
        # pad_before = To - 1 and pad_after = Ta - 1: see the diagram in sampler.py.
        self._windows_np = create_windows(
            self.episode_ends,
            self.horizon,
            self.n_obs_steps - 1,
            self.n_action_steps - 1,
            self.episode_mask,
        )
        self._windows = torch.from_numpy(self._windows_np).to(self._device)

    def view(self, episode_mask: np.ndarray) -> ReplayDataset:
        """Another dataset over the same frames (no copy) with a different episode mask."""
        other = copy.copy(self)
        other._set_mask(episode_mask)
        return other

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> ReplayDataset:
        """Make every frame and the window table resident on `device` (in place; returns self)."""
        self._device = _resolve(device)
        self._frames.on(self._device)
        self._windows = self._windows.to(self._device)
        return self

    def __len__(self) -> int:
        return len(self._windows_np)

    def __getitem__(self, i: int) -> dict:
        """One numpy sample: {"obs": {key: (To, ...)}, "action": (T, Da)}."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows)")
        t = window_frames(self._windows_np[[i]], self.horizon)[0]
        obs = {k: self._rows(k, t[: self.n_obs_steps]) for k in self.shape_meta.obs}
        return {"obs": obs, "action": self._frames.numpy["action"][t]}

    def _rows(self, key: str, t: np.ndarray) -> np.ndarray:
        """Frames of one policy key at absolute frame indices t, as numpy."""
        return self._frames.numpy[key][t]

    def get_batch(self, idx: torch.Tensor) -> dict:
        """idx (B,) long on self.device -> {"obs": {key: (B, To, ...)}, "action": (B, T, Da)} on self.device."""
        t = window_frames(self._windows[idx], self.horizon)  # (B, T) frame indices
        f = self._frames.on(self._device)
        obs_t = t[:, : self.n_obs_steps].contiguous()
        obs = {k: _gather(f[k], obs_t) for k in self.shape_meta.obs}
        return {"obs": obs, "action": _gather(f["action"], t)}

    def normalizer_data(self) -> dict[str, np.ndarray]:
        """ALL frames of ALL episodes (as the original fits the normaliser): action and low-dim obs, (N, D)."""
        keys = ["action", *(k for k, s in self.shape_meta.obs.items() if s.kind == "low_dim")]
        return {k: self._frames.numpy[k] for k in keys}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.spec.label}, {len(self)} windows from {int(self.episode_mask.sum())} episodes, "
            f"T={self.horizon}, To={self.n_obs_steps}, Ta={self.n_action_steps}, device={self._device})"
        )


class OnDiskDataset(ReplayDataset):
    """A ReplayDataset whose camera frames stay in the store: each batch's windows are read from the
    zarr chunks (data/ondisk.py), ahead of the step once `follow` names the schedule. Low-dim keys
    and the action are held in host RAM (a few bytes per frame). Batches equal the resident path's
    bit for bit; `.to(device)` moves only the window table, and each batch is copied there.
    """

    def __init__(self, *args, cache_mb: int = 0, **kw):
        self._cache_mb = cache_mb
        self._prefetch: Prefetcher | None = None
        super().__init__(*args, **kw)

    def _read_frames(self, buffer: ReplayBuffer, spec: TaskSpec) -> dict[str, np.ndarray]:
        self._disk = DiskFrames(buffer, spec, self._cache_mb)
        low = {k: v for k, v in spec.obs.items() if k not in self._disk.keys}
        frames = read_frames(buffer, dataclasses.replace(spec, obs=low))
        return {**frames, **self._disk.placeholders()}

    def view(self, episode_mask: np.ndarray) -> OnDiskDataset:
        other = super().view(episode_mask)
        other._prefetch = None  # a view follows no schedule of its own
        return other

    def to(self, device: str | torch.device) -> OnDiskDataset:
        """Put the window table on `device` (batches are copied there); frames stay where they are."""
        self._device = _resolve(device)
        self._windows = self._windows.to(self._device)
        return self

    def follow(
        self,
        indices_at: Callable[[int], torch.Tensor],
        depth: int = 2,
        locate: Callable[[np.ndarray], int | None] | None = None,
        threads: int = 1,
    ) -> OnDiskDataset:
        """Read the batches of steps to come in a background thread: `indices_at(step)` is the
        training schedule, `locate(idx)` finds the step of a batch (a resumed run's first)."""
        if self._prefetch is not None:
            self._prefetch.close()
        self._prefetch = Prefetcher(self._load, indices_at, depth, locate, threads)
        return self

    def _rows(self, key: str, t: np.ndarray) -> np.ndarray:
        return self._disk.read(key, t) if key in self._disk.keys else super()._rows(key, t)

    def _load(self, idx: np.ndarray) -> dict:
        """The batch of window indices idx as CPU tensors (pinned when batches go to CUDA)."""
        t = torch.from_numpy(window_frames(self._windows_np[idx], self.horizon))
        obs_t = t[:, : self.n_obs_steps].contiguous()
        f = self._frames.on(torch.device("cpu"))
        obs = {}
        for k in self.shape_meta.obs:
            if k in self._disk.keys:
                rows = self._disk.read(k, obs_t.numpy())
                obs[k] = torch.from_numpy(rows.reshape(*obs_t.shape, *rows.shape[1:]))
            else:
                obs[k] = _gather(f[k], obs_t)
        batch = {"obs": obs, "action": _gather(f["action"], t)}
        if self._device.type == "cuda":
            batch = {"obs": {k: v.pin_memory() for k, v in obs.items()}, "action": batch["action"].pin_memory()}  # fmt: skip
        return batch

    def get_batch(self, idx: torch.Tensor) -> dict:
        idx_np = idx.cpu().numpy()
        batch = self._prefetch.get(idx_np) if self._prefetch is not None else self._load(idx_np)
        if self._device.type == "cpu":
            return batch
        move = lambda v: v.to(self._device, non_blocking=True)  # noqa: E731
        return {
            "obs": {k: move(v) for k, v in batch["obs"].items()},
            "action": move(batch["action"]),
        }


class PushTDataset(ReplayDataset):
    """A Push-T store read by its `obs_type` shorthand (the spec `pusht_spec(obs_type)` declares)."""

    def __init__(
        self,
        buffer: ReplayBuffer,
        obs_type: str,
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
        episode_mask: np.ndarray | None = None,
    ):
        self.obs_type = obs_type
        spec = pusht_spec(obs_type)
        super().__init__(buffer, spec, horizon, n_obs_steps, n_action_steps, episode_mask)


def make_datasets(
    path: str,
    spec: TaskSpec,
    horizon: int,
    n_obs_steps: int,
    n_action_steps: int,
    val_ratio: float = 0.02,
    split_seed: int = 42,
    max_train_episodes: int | None = 90,
    val_episodes: str = "heldout",
    on_disk: bool = False,
) -> tuple[ReplayDataset, ReplayDataset | None]:
    """Loads the store once (only the keys the spec reads) and returns train and val views sharing
    memory; `on_disk`: camera frames stay in the store and are read per batch (OnDiskDataset)."""
    if val_episodes not in VAL_EPISODES:
        raise ValueError(f"val_episodes must be one of {VAL_EPISODES}, got {val_episodes!r}")
    # Open on disk and convert block by block: pixels never exist in RAM as float32 (2.8 GB).
    buffer = ReplayBuffer.open(path, "r", keys=[])
    check_spec(buffer, spec)  # spec problems name the spec key, before the store's own checks
    buffer._check_structure(chunk_keys=spec.store_keys())  # chunk files of the keys we read
    val_mask = get_val_mask(buffer.n_episodes, val_ratio, split_seed)
    train_mask = downsample_mask(~val_mask, max_train_episodes, split_seed)
    cls = OnDiskDataset if on_disk else ReplayDataset
    train = cls(buffer, spec, horizon, n_obs_steps, n_action_steps, train_mask)
    if len(train) == 0:
        lengths = buffer.episode_lengths[train_mask]
        shortest = max(1, horizon - (n_obs_steps - 1) - (n_action_steps - 1))
        raise DataError(
            f"{path}: no training windows: the {len(lengths)} training episodes are "
            f"{int(lengths.min(initial=0))}..{int(lengths.max(initial=0))} steps long, but horizon "
            f"{horizon} with n_obs_steps {n_obs_steps} and n_action_steps {n_action_steps} needs "
            f"episodes of at least {shortest} steps (shorten policy.horizon, or record longer episodes)"
        )
    heldout = val_mask if val_episodes == "heldout" else ~train_mask
    val = train.view(heldout) if heldout.any() else None
    return train, val


def make_pusht_datasets(
    path: str, obs_type: str, horizon: int, n_obs_steps: int, n_action_steps: int, *split, **kw
) -> tuple[ReplayDataset, ReplayDataset | None]:
    """`make_datasets` for a Push-T store read by its obs_type shorthand."""
    spec = pusht_spec(obs_type)
    return make_datasets(path, spec, horizon, n_obs_steps, n_action_steps, *split, **kw)
