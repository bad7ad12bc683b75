"""Fixed-length training windows over episodes, with edge padding, plus the train/val episode split.

One episode of L = 6 frames, horizon T = 8, n_obs_steps To = 2, n_action_steps Ta = 4,
so pad_before = To - 1 = 1 and pad_after = Ta - 1 = 3 (both clamped to [0, T - 1]):

    frame index in episode:      0  1  2  3  4  5
                               +--+--+--+--+--+--+
                               |f0|f1|f2|f3|f4|f5|
                               +--+--+--+--+--+--+
    window start s = -1:     f0 f0 f1 f2 f3 f4 f5 f5      <- first window: f0 repeated (pad_before)
    window start s =  0:        f0 f1 f2 f3 f4 f5 f5 f5
    window start s =  1:           f1 f2 f3 f4 f5 f5 f5 f5 <- last window: f5 repeated (pad_after)
    windows per episode = L - T + pad_before + pad_after + 1 = 6 - 8 + 1 + 3 + 1 = 3

    inside one window (k = 0 .. T-1):
        k:        0    1    2    3    4    5    6    7
        obs[k]:  [o0   o1]                                  the policy conditions on obs[0:To]
        act[k]:   a0   a1   a2   a3   a4   a5   a6   a7     it predicts all T actions ...
                       [executed: a1  a2   a3   a4]         ... and executes [To-1, To-1+Ta)
    obs[k] and act[k] are the same time step: act[k] is the command issued right after seeing obs[k].

Edge padding of a window starting at s is exactly `frame = clip(s + arange(T), ep_start, ep_end - 1)`,
so a window is fully described by three integers (start, ep_start, ep_end) and gathering a batch is one
fancy-index per key, on numpy arrays or on torch tensors already on the GPU. Windows never cross episodes
because the clip bounds are the window's own episode. The original (PUSHT_SPEC.md §2.3) copies slices and
fills pads per sample; the result is identical.

Split (PUSHT_SPEC.md §2.4): `get_val_mask` holds out round(n * val_ratio) episodes; `downsample_mask`
keeps at most max_n training episodes. The paper preset (0.02, seed 42, 90) gives val {18, 90, 134, 157}.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def create_windows(
    episode_ends: np.ndarray,
    horizon: int,
    pad_before: int = 0,
    pad_after: int = 0,
    episode_mask: np.ndarray | None = None,
) -> np.ndarray:
    """(W, 3) int64 table of [start, ep_start, ep_end] for every window of every masked-in episode.

    `start` may be negative relative to the episode (it is an absolute frame index that can fall before
    ep_start or run past ep_end - horizon); `window_frames` clips it. Vectorised: no per-episode loop.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    pad_before = int(np.clip(pad_before, 0, horizon - 1))
    pad_after = int(np.clip(pad_after, 0, horizon - 1))
    ends = np.asarray(episode_ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    if episode_mask is not None:
        mask = np.asarray(episode_mask, dtype=bool)
        if mask.shape != ends.shape:
            raise ValueError(f"episode_mask has shape {mask.shape}, expected {ends.shape}")
        starts, ends = starts[mask], ends[mask]
    counts = np.maximum(0, ends - starts - horizon + pad_before + pad_after + 1)
    ep = np.repeat(np.arange(len(ends)), counts)
    # Position of each window inside its episode's run: 0, 1, ..., count - 1.
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    first = starts[ep] - pad_before
    return np.stack([first + offset, starts[ep], ends[ep]], axis=1).astype(np.int64)


def window_frames(windows: ArrayLike, horizon: int) -> ArrayLike:
    """(W, 3) windows -> (W, horizon) absolute frame indices with edge padding (numpy or torch)."""
    if isinstance(windows, torch.Tensor):
        t = windows[:, :1] + torch.arange(horizon, device=windows.device)
        return torch.minimum(torch.maximum(t, windows[:, 1:2]), windows[:, 2:3] - 1)
    t = windows[:, :1] + np.arange(horizon)
    return np.clip(t, windows[:, 1:2], windows[:, 2:3] - 1)


def get_val_mask(n_episodes: int, val_ratio: float, seed: int = 0) -> np.ndarray:
    """Boolean (n_episodes,) mask of held-out episodes; same draw as the original, so same episodes."""
    mask = np.zeros(n_episodes, dtype=bool)
    if val_ratio <= 0 or n_episodes < 2:
        return mask
    n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    mask[np.random.default_rng(seed).choice(n_episodes, size=n_val, replace=False)] = True
    return mask


def downsample_mask(mask: np.ndarray, max_n: int | None, seed: int = 0) -> np.ndarray:
    """Keep at most `max_n` of the True entries, chosen with a fresh default_rng(seed) (as the original)."""
    mask = np.asarray(mask, dtype=bool)
    if max_n is None or mask.sum() <= max_n:
        return mask.copy()
    idx = np.flatnonzero(mask)
    keep = np.random.default_rng(seed).choice(len(idx), size=max_n, replace=False)
    out = np.zeros_like(mask)
    out[idx[keep]] = True
    return out
