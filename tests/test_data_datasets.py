"""PushTDataset: obs keys/contents per obs type, get_batch == __getitem__, and the real store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_policy.data.datasets import PushTDataset, make_pusht_datasets
from diffusion_policy.data.pusht_format import OBS_TYPES
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.errors import DataError
from diffusion_policy.shapes import ShapeMeta

LENGTHS = (12, 9, 20, 15, 10)


def tiny_pusht(path: Path) -> Path:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.create_empty()
    for n in LENGTHS:
        state = rng.uniform(0, 512, (n, 5)).astype(np.float32)
        state[:, 4] = rng.uniform(-10, 10, n)  # raw, unwrapped angles
        buf.add_episode(
            {
                "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
                "state": state,
                "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
                "img": rng.uniform(0, 255, (n, 96, 96, 3)).astype(np.float32),
            }
        )
    return buf.save(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_pusht(tmp_path_factory.mktemp("d") / "tiny.zarr")


@pytest.mark.parametrize("obs_type", OBS_TYPES)
def test_get_batch_matches_getitem(tiny: Path, obs_type: str):
    ds = PushTDataset(ReplayBuffer.load(tiny), obs_type, horizon=8, n_obs_steps=2, n_action_steps=4)
    assert len(ds) == sum(n - 8 + 1 + 3 + 1 for n in LENGTHS)
    idx = torch.tensor([0, 5, len(ds) - 1])
    batch = ds.get_batch(idx)
    assert batch["action"].shape == (3, 8, 2) and batch["action"].dtype == torch.float32
    for k, spec in ds.shape_meta.obs.items():
        assert batch["obs"][k].shape == (3, 2, *spec.shape)
        assert batch["obs"][k].dtype == (torch.uint8 if spec.kind == "rgb" else torch.float32)
    for j, i in enumerate(idx.tolist()):
        sample = ds[i]
        np.testing.assert_array_equal(batch["action"][j].numpy(), sample["action"])
        for k in ds.shape_meta.obs:
            np.testing.assert_array_equal(batch["obs"][k][j].numpy(), sample["obs"][k])
    assert ShapeMeta.from_dict(ds.shape_meta.to_dict()) == ds.shape_meta
    n = sum(LENGTHS)
    nd = ds.normalizer_data()
    assert nd["action"].shape == (n, 2) and all(v.shape[0] == n for v in nd.values())
    assert set(nd) == {"action"} | {k for k, s in ds.shape_meta.obs.items() if s.kind == "low_dim"}


def test_obs_contents(tiny: Path):
    buf = ReplayBuffer.load(tiny)
    st = PushTDataset(buf, "state", 4, 2, 1)._frames.numpy["state"]
    np.testing.assert_allclose(st[:, 4], np.mod(buf["state"][:, 4], 2 * np.pi), rtol=1e-6)
    assert (st[:, 4] >= 0).all() and (st[:, 4] < 2 * np.pi + 1e-6).all()
    px = PushTDataset(buf, "pixels_agent_pos", 4, 2, 1)
    assert list(px.shape_meta.obs) == ["pixels", "agent_pos"]  # rgb first
    np.testing.assert_array_equal(px._frames.numpy["pixels"], np.rint(buf["img"]).astype(np.uint8))
    with pytest.raises(DataError, match="obs_type"):
        PushTDataset(buf, "pixels", 4, 2, 1)
    with pytest.raises(DataError, match="missing key data/keypoint"):
        PushTDataset(ReplayBuffer.load(tiny, keys=["state", "action"]), "keypoints", 4, 2, 1)


def test_first_obs_and_actions_align(tiny: Path):
    """Window 0 starts one frame before episode 0 (pad_before = To - 1): obs[0] == obs[1] == frame 0."""
    buf = ReplayBuffer.load(tiny)
    ds = PushTDataset(buf, "state", horizon=8, n_obs_steps=2, n_action_steps=4)
    s = ds[0]
    np.testing.assert_array_equal(s["action"][:2], buf["action"][[0, 0]])
    np.testing.assert_array_equal(s["action"][2:], buf["action"][1:7])
    np.testing.assert_array_equal(s["obs"]["state"][0], s["obs"]["state"][1])


def test_splits_share_frames(tiny: Path):
    train, val = make_pusht_datasets(
        str(tiny), "keypoints", 8, 2, 4, val_ratio=0.2, split_seed=0, max_train_episodes=2
    )
    assert train.episode_mask.sum() == 2 and val.episode_mask.sum() == 1
    assert not (train.episode_mask & val.episode_mask).any()
    assert train._frames is val._frames
    _, comp = make_pusht_datasets(
        str(tiny), "keypoints", 8, 2, 4, 0.2, 0, 2, val_episodes="complement"
    )
    assert comp.episode_mask.sum() == 3
    _, none = make_pusht_datasets(str(tiny), "keypoints", 8, 2, 4, val_ratio=0.0)
    assert none is None


# ---------------------------------------------------------------- the real store
@pytest.mark.real_data
def test_real_keypoints_obs(pusht_zarr: Path):
    train, val = make_pusht_datasets(str(pusht_zarr), "keypoints", 16, 2, 8)
    assert set(np.flatnonzero(val.episode_mask)) == {18, 90, 134, 157}
    assert train.episode_mask.sum() == 90
    raw = ReplayBuffer.load(pusht_zarr, keys=["keypoint", "state"])
    kp = train.normalizer_data()["keypoints"]  # all 25,650 frames
    np.testing.assert_array_equal(
        kp, np.concatenate([raw["keypoint"].reshape(-1, 18), raw["state"][:, :2]], 1)
    )
    lengths = np.diff(raw.episode_ends, prepend=0)
    assert len(train) == (lengths[train.episode_mask] - 7).sum()
    b = train.get_batch(torch.arange(len(train)))  # every window: stays inside its episode
    assert b["obs"]["keypoints"].shape == (len(train), 2, 20)


@pytest.mark.real_data
def test_real_pixels_uint8(pusht_images: ReplayBuffer):
    ds = PushTDataset(pusht_images, "pixels_agent_pos", 16, 2, 8)
    px = ds._frames.numpy["pixels"]
    assert px.dtype == np.uint8 and px.shape == (25650, 96, 96, 3)
    sub = slice(None, None, 25)  # 1,026 frames: comparing all 2.8 GB would dominate the test time
    np.testing.assert_array_equal(px[sub], np.rint(pusht_images["img"][sub]).astype(np.uint8))
    b = ds.get_batch(torch.tensor([0, 100]))
    assert b["obs"]["pixels"].dtype == torch.uint8 and b["obs"]["agent_pos"].shape == (2, 2, 2)


# Digests of get_batch (train and val, 64 seeded windows), normalizer_data and shape_meta, computed by
# main's PushTDataset (commit 1d1eae4) before tasks were declared: the Push-T shorthand must give the
# same bytes through the declared spec.
PINNED = {
    "state": "3839e5d8280289bbba0dc101d8da5e4d22387f28c546ce72345b4f095c3c63cc",
    "keypoints": "709a6060608aabc9e1a432e3dc693088c0c58848433311debdbbac7ee1972b5b",
    "pixels_agent_pos": "37f88b6ae88c0e401007fe5a06ae53588d45761698f4edc8b9def6f7011c2bad",
}


@pytest.mark.real_data
@pytest.mark.parametrize("obs_type", OBS_TYPES)
def test_real_batches_unchanged(pusht_zarr: Path, obs_type: str):
    import hashlib
    import json

    train, val = make_pusht_datasets(str(pusht_zarr), obs_type, 16, 2, 8)
    assert (len(train), len(val)) == (10726, 404)
    h = hashlib.sha256()
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:64]
    for ds in (train, val):
        b = ds.get_batch(idx % len(ds))
        for k in sorted(b["obs"]):
            h.update(k.encode())
            h.update(b["obs"][k].numpy().tobytes())
        h.update(b["action"].numpy().tobytes())
    nd = train.normalizer_data()
    for k in sorted(nd):
        h.update(k.encode())
        h.update(np.ascontiguousarray(nd[k]).tobytes())
    h.update(json.dumps(train.shape_meta.to_dict()).encode())
    assert h.hexdigest() == PINNED[obs_type]
