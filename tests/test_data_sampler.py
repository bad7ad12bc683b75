"""Windows, edge padding and counts of the sampler, and the pinned Push-T train/val split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_policy.data.sampler import (
    create_windows,
    downsample_mask,
    get_val_mask,
    window_frames,
)

ENDS = np.array([6, 9, 20])  # episode lengths 6, 3, 11


def reference_windows(ends, horizon, pad_before, pad_after):
    """The original's per-sample construction (PUSHT_SPEC.md §2.3), written as a plain loop."""
    out, start = [], 0
    for end in ends:
        L = end - start
        for s in range(-pad_before, L - horizon + pad_after + 1):
            frames = [start + min(max(s + k, 0), L - 1) for k in range(horizon)]
            out.append(frames)
        start = end
    return np.array(out).reshape(-1, horizon)


@pytest.mark.parametrize("horizon,pb,pa", [(4, 1, 3), (8, 1, 7), (2, 0, 0), (16, 1, 7), (3, 5, 5)])
def test_windows_match_reference(horizon, pb, pa):
    w = create_windows(ENDS, horizon, pb, pa)
    pb_c, pa_c = min(pb, horizon - 1), min(pa, horizon - 1)
    np.testing.assert_array_equal(
        window_frames(w, horizon), reference_windows(ENDS, horizon, pb_c, pa_c)
    )
    lengths = np.diff(ENDS, prepend=0)
    assert len(w) == np.maximum(0, lengths - horizon + pb_c + pa_c + 1).sum()


def test_padding_at_episode_start_and_end():
    w = create_windows(ENDS, horizon=4, pad_before=1, pad_after=3)
    f = window_frames(w, 4)
    first_ep0 = f[0]
    np.testing.assert_array_equal(first_ep0, [0, 0, 1, 2])  # frame 0 repeated before the start
    last_ep0 = f[len(np.flatnonzero(w[:, 2] == 6)) - 1]
    np.testing.assert_array_equal(last_ep0, [5, 5, 5, 5])  # last frame repeated after the end
    ep1 = f[w[:, 1] == 6]  # the 3-frame episode
    np.testing.assert_array_equal(ep1[0], [6, 6, 7, 8])
    np.testing.assert_array_equal(ep1[-1], [8, 8, 8, 8])


def test_no_window_crosses_episodes_and_masks():
    w = create_windows(ENDS, 5, 1, 4, episode_mask=np.array([True, False, True]))
    f = window_frames(w, 5)
    assert ((f >= w[:, 1:2]) & (f < w[:, 2:3])).all()
    assert not np.isin(f, [6, 7, 8]).any()  # the masked-out episode
    assert len(create_windows(ENDS, 5, 1, 4, episode_mask=np.zeros(3, bool))) == 0


def test_torch_gather_equals_numpy():
    w = create_windows(ENDS, 8, 1, 7)
    np.testing.assert_array_equal(
        window_frames(torch.from_numpy(w), 8).numpy(), window_frames(w, 8)
    )


def test_pusht_counts_horizon16():
    lengths = np.array([49, 124, 246])
    w = create_windows(np.cumsum(lengths), 16, 1, 7)
    assert len(w) == (lengths - 7).sum()  # L - 7 windows per episode (spec §2.3)


def test_val_mask_rules():
    assert not get_val_mask(10, 0.0, 0).any()
    assert get_val_mask(10, 0.01, 0).sum() == 1  # at least one
    assert get_val_mask(10, 0.99, 0).sum() == 9  # at most n - 1
    assert not get_val_mask(1, 0.5, 0).any()
    m = np.ones(10, bool)
    assert downsample_mask(m, None).sum() == 10 and downsample_mask(m, 20).sum() == 10
    assert downsample_mask(m, 3, 0).sum() == 3


def test_pusht_paper_split_is_pinned():
    val = get_val_mask(206, 0.02, 42)
    assert set(np.flatnonzero(val)) == {18, 90, 134, 157}
    train = downsample_mask(~val, 90, 42)
    assert train.sum() == 90 and not (train & val).any()
    assert not train[
        :6
    ].any()  # seeds 0-5 (the "train" rollouts) are not trained on, as in the original
    assert (~train).sum() == 116  # the original's validation set ("complement")
