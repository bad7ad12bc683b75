"""The on-disk path (data/ondisk.py, datasets.OnDiskDataset): the same batches as the resident path
for the same (seed, step), on a two-camera store and on the real Push-T store; prefetching follows
the training schedule and re-finds it on resume; a short on-disk training run resumes bit for bit;
data.resident=auto picks the path by size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from diffusion_policy.config import config_from_nodes, load_config
from diffusion_policy.data import ondisk
from diffusion_policy.data.datasets import OnDiskDataset, ReplayDataset, make_datasets, task_spec
from diffusion_policy.data.pusht_format import pusht_spec
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.errors import ConfigError
from diffusion_policy.training.build import Dist, batch_indices, locate_step

LENGTHS = (23, 9, 31, 17, 12)
H, W = 12, 16
CHUNK = 5  # frames per image chunk: many chunks, windows that straddle them


def two_camera_store(path: Path) -> Path:
    """Two uint8 cameras chunked CHUNK frames in time (as ours are, only smaller), a 7-d state and action."""
    rng = np.random.default_rng(0)
    n = sum(LENGTHS)
    g = zarr.open_group(str(path), mode="w-", zarr_format=3)
    data = {
        "front": rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8),
        "state": rng.normal(size=(n, 7)).astype(np.float32),
        "action": rng.normal(size=(n, 7)).astype(np.float32),
    }
    for k, v in data.items():
        chunks = (CHUNK, H, W, 3) if v.ndim == 4 else (n, 7)
        g.require_group("data").create_array(k, data=v, chunks=chunks)
    g.require_group("meta").create_array("episode_ends", data=np.cumsum(LENGTHS).astype(np.int64))
    return path


OBS = {
    "front": {"kind": "rgb", "source": ["front"]},
    "wrist": {"kind": "rgb", "source": ["wrist"]},
    "state": {"kind": "low_dim", "source": ["state"]},
}


def spec_of(path: Path):
    node = {"dataset": str(path), "env_id": None, "obs": OBS, "action": {"source": ["action"]}}
    return task_spec(config_from_nodes([{"task": node}]).task)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return two_camera_store(tmp_path_factory.mktemp("ondisk") / "two_cam.zarr")


def assert_same(a: dict, b: dict) -> None:
    assert list(a["obs"]) == list(b["obs"])
    for k in a["obs"]:
        assert a["obs"][k].dtype == b["obs"][k].dtype and torch.equal(a["obs"][k], b["obs"][k]), k
    assert torch.equal(a["action"], b["action"])


def schedule(n: int, batch: int, seed: int = 3):
    return lambda step: batch_indices(n, batch, step, seed, Dist(), "cpu")


def same_batches(resident, on_disk, steps, batch: int) -> None:
    at = schedule(len(resident), batch)
    for step in steps:
        assert_same(resident.get_batch(at(step)), on_disk.get_batch(at(step)))


@pytest.mark.parametrize("cache_mb", [0, 1])
def test_two_camera_batches_equal_the_resident_ones(store: Path, cache_mb: int):
    spec = spec_of(store)
    kw = {"val_ratio": 0.2, "max_train_episodes": None}
    res, res_val = make_datasets(str(store), spec, 8, 2, 4, **kw)
    disk, disk_val = make_datasets(str(store), spec, 8, 2, 4, on_disk=True, **kw)
    assert isinstance(disk, OnDiskDataset) and type(res) is ReplayDataset
    disk._disk = ondisk.DiskFrames(ReplayBuffer.open(store), spec, cache_mb)
    assert disk.shape_meta == res.shape_meta and len(disk) == len(res)
    same_batches(res, disk, range(6), 16)  # read directly
    disk.follow(schedule(len(disk), 16), depth=3)
    same_batches(res, disk, range(6), 16)  # prefetched: steps 1.. come from the thread
    assert disk._prefetch.hits == 5 and disk._prefetch.misses == 1
    same_batches(res_val, disk_val, range(2), 4)  # the validation view
    for i in (0, len(res) // 2, len(res) - 1):
        a, b = res[i], disk[i]
        assert all(np.array_equal(a["obs"][k], b["obs"][k]) for k in a["obs"])
    assert all(np.array_equal(v, disk.normalizer_data()[k]) for k, v in res.normalizer_data().items())  # fmt: skip


def test_prefetch_refinds_the_schedule_of_a_resumed_run(store: Path):
    spec = spec_of(store)
    res, _ = make_datasets(str(store), spec, 8, 2, 4, val_ratio=0, max_train_episodes=None)
    disk, _ = make_datasets(str(store), spec, 8, 2, 4, val_ratio=0, max_train_episodes=None, on_disk=True)  # fmt: skip
    n, batch = len(disk), 16
    find = lambda idx: locate_step(idx, n=n, global_batch=batch, seed=3, d=Dist(), max_steps=40)  # noqa: E731
    assert [find(schedule(n, batch)(s).numpy()) for s in (0, 7, 23)] == [0, 7, 23]
    assert find(np.array([0, 0, 0])) is None
    disk.follow(schedule(n, batch), locate=find)
    same_batches(res, disk, range(17, 23), batch)  # resumed at step 17
    assert disk._prefetch.hits == 5 and disk._prefetch.misses == 1
    other = torch.arange(batch)  # an off-schedule call (validation) is read directly ...
    assert_same(res.get_batch(other), disk.get_batch(other))
    same_batches(res, disk, [23], batch)  # ... and the schedule goes on
    assert disk._prefetch.hits == 6


@pytest.mark.real_data
@pytest.mark.parametrize("obs_type", ["keypoints", "pixels_agent_pos"])
def test_pusht_batches_equal_the_resident_ones(pusht_zarr: Path, obs_type: str):
    spec = pusht_spec(obs_type)
    res, res_val = make_datasets(str(pusht_zarr), spec, 16, 2, 8)
    disk, disk_val = make_datasets(str(pusht_zarr), spec, 16, 2, 8, on_disk=True)
    assert disk.shape_meta == res.shape_meta and len(disk) == len(res)
    disk.follow(schedule(len(disk), 64))
    same_batches(res, disk, [0, 1, 2, 500], 64)
    same_batches(res_val, disk_val, [0], 32)


SMOKE_DISK = """
inherit: smoke
task:
  name: two_cam
  dataset: {dataset}
  env_id: null
  obs:
    front: {{kind: rgb, source: [front]}}
    wrist: {{kind: rgb, source: [wrist]}}
    state: {{kind: low_dim, source: [state]}}
  action: {{source: [action], dim: 7}}
data: {{max_train_episodes: null, resident: disk, val_ratio: 0.2}}
policy:
  encoder: {{crop_shape: [10, 14], resnet_width: 16, num_keypoints: 8, image_feature_dim: 16}}
train:
  batch_size: 4
  max_steps: 4
  device: cpu
  progress: false
  cadence: {{eval_every: 0, final_eval: false, val_every: 2, checkpoint_every: 2}}
wandb: {{mode: disabled}}
"""


def test_on_disk_training_resumes_bit_for_bit(store: Path, tmp_path: Path, one_thread, monkeypatch):
    from safetensors.torch import load_file

    from diffusion_policy.cli.main import main

    made, init = [], ondisk.Prefetcher.__init__
    monkeypatch.setattr(ondisk.Prefetcher, "__init__", lambda s, *a, **k: (init(s, *a, **k), made.append(s))[0])  # fmt: skip
    preset = tmp_path / "disk.yaml"
    preset.write_text(SMOKE_DISK.format(dataset=store))
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", str(preset), f"run_dir={straight}"]) == 0
    assert main(["train", str(preset), f"run_dir={split}", "train.stop_at_step=2"]) == 0
    assert main(["train", "--resume", str(split), "train.stop_at_step=null"]) == 0
    # steps 1..3 came from the prefetch thread; the resumed run found step 2 and prefetched step 3
    assert [p.hits for p in made] == [3, 1, 1]
    for name in ("train_state/raw_model.safetensors", "model.safetensors"):
        a = load_file(str(straight / "checkpoints" / "latest" / name))
        b = load_file(str(split / "checkpoints" / "latest" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_residency_auto_picks_by_size(store: Path, monkeypatch):
    nbytes = ondisk.frames_nbytes(ReplayBuffer.open(store, "r", keys=[]), spec_of(store))
    assert nbytes == sum(LENGTHS) * (2 * H * W * 3 + 2 * 7 * 4)
    monkeypatch.setattr(ondisk, "host_available", lambda: 4 * nbytes)
    assert ondisk.residency("auto", nbytes, "cpu")[0] == "device"
    monkeypatch.setattr(ondisk, "host_available", lambda: nbytes)
    where, why = ondisk.residency("auto", nbytes, "cpu")
    assert where == "disk" and "50% of" in why
    assert [ondisk.residency(v, nbytes, "cpu")[0] for v in (True, False, "disk")] == [
        "device",
        "host",
        "disk",
    ]


def test_resident_key_loads_old_bools_and_refuses_others(tmp_path: Path):
    assert load_config("smoke").data.resident == "auto"
    assert load_config("smoke", ["data.resident=false"]).data.resident is False
    assert load_config("smoke", ["data.resident=true"]).data.resident is True
    legacy = Path(__file__).parent / "fixtures/legacy_7b92bc3/diffusion_keypoints/config.yaml"
    from diffusion_policy.config import config_from_yaml

    assert config_from_yaml(legacy).data.resident is True
    with pytest.raises(ConfigError, match="data.resident='sometimes'"):
        load_config("smoke", ["data.resident=sometimes"])
