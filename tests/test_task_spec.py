"""Declared tasks: a two-camera, 7-DoF store trains end to end; every spec problem is one line naming
the key; `dp data info` prints a task block that trains as pasted; identity normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion_policy.config import config_from_nodes
from diffusion_policy.data.datasets import make_datasets, task_spec
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.errors import ConfigError, DataError
from diffusion_policy.shapes import ObsSpec, ShapeMeta

LENGTHS = (14, 11, 17, 12)
H, W = 32, 40


def robot_store(path: Path, **override: np.ndarray) -> Path:
    """Two uint8 cameras, a 6-d eef pose + 2-d gripper (the spec takes gripper[0:1]: 7-d state), 7-d action."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.create_empty()
    for n in LENGTHS:
        buf.add_episode(
            {
                "front": rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8),
                "wrist": rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8),
                "eef_pos": rng.normal(size=(n, 6)).astype(np.float32),
                "gripper": rng.uniform(0, 1, (n, 2)).astype(np.float32),
                "action": rng.normal(size=(n, 7)).astype(np.float32),
                **{k: v[:n] for k, v in override.items()},
            }
        )
    return buf.save(path)


OBS = {
    "front": {"kind": "rgb", "source": ["front"], "crop": [28, 36]},
    "wrist": {"kind": "rgb", "resize": [24, 30], "crop": [20, 26]},  # source defaults to [wrist]
    "state": {"kind": "low_dim", "source": ["eef_pos", "gripper[0:1]"]},
}


def task_cfg(path: Path, obs: dict | None = None, action: dict | None = None, **task):
    node = {"dataset": str(path), "env_id": None, "obs": obs or OBS, **task}
    node["action"] = action or {"source": ["action"], "dim": 7}
    return config_from_nodes([{"task": node}]).task


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return robot_store(tmp_path_factory.mktemp("robot") / "robot.zarr")


def test_declared_dataset(store: Path):
    train, val = make_datasets(str(store), task_spec(task_cfg(store)), 8, 2, 4, val_ratio=0.25)
    assert list(train.shape_meta.obs) == ["front", "wrist", "state"]  # rgb first
    sm = train.shape_meta
    assert sm.obs["front"] == ObsSpec((H, W, 3), "uint8", "rgb", crop=(28, 36))
    assert sm.obs["wrist"].resize == (24, 30) and sm.obs["state"].shape == (7,)
    assert sm.action_dim == 7 and ShapeMeta.from_dict(sm.to_dict()) == sm
    raw = ReplayBuffer.load(store)
    state = train.normalizer_data()["state"]
    np.testing.assert_array_equal(state, np.concatenate([raw["eef_pos"], raw["gripper"][:, :1]], 1))
    b = train.get_batch(torch.tensor([0, 3]))
    assert b["obs"]["front"].dtype == torch.uint8 and b["obs"]["front"].shape == (2, 2, H, W, 3)
    assert b["obs"]["state"].shape == (2, 2, 7) and b["action"].shape == (2, 8, 7)
    assert val is not None and not (train.episode_mask & val.episode_mask).any()


def test_pusht_shorthand_and_declared_obs_wins(tmp_path: Path):
    cfg = config_from_nodes([{"task": {"obs_type": "pixels_agent_pos"}}]).task
    spec = task_spec(cfg)
    assert list(spec.obs) == ["pixels", "agent_pos"] and spec.obs["pixels"].kind == "rgb"
    declared = task_spec(task_cfg(tmp_path, obs_type="state"))
    assert list(declared.obs) == ["front", "wrist", "state"]


@pytest.mark.parametrize(
    "obs, action, message",
    [
        ({"cam": {"kind": "rgb", "source": ["camera_9"]}}, None,
         r"task\.obs\.cam: source 'camera_9': missing key data/camera_9 \(the store has: action, eef_pos, front, gripper, wrist\)"),
        ({"s": {"source": ["eef_pos"], "shape": [7]}}, None,
         r"task\.obs\.s: declared shape \[7\] but the store gives \[6\]"),
        ({"s": {"source": ["gripper[1:3]"]}}, None,
         r"task\.obs\.s: source 'gripper\[1:3\]' is out of range: data/gripper has 2 values per frame"),
        ({"cam": {"kind": "rgb", "source": ["eef_pos"]}}, None,
         r"task\.obs\.cam: data/eef_pos is float32; an rgb key needs uint8 frames"),
        ({"s": {"source": ["eef_pos"]}}, {"source": ["action"], "dim": 6},
         r"task\.action: declared shape \[6\] but the store gives \[7\]"),
        ({"s": {"source": ["eef pos[0:"]}}, None, r'task\.obs\.s: source .*expected "key" or "key\[a:b\]"'),
    ],
)  # fmt: skip
def test_spec_errors_name_the_key(store: Path, obs, action, message):
    with pytest.raises(DataError, match=message) as e:
        make_datasets(str(store), task_spec(task_cfg(store, obs, action)), 8, 2, 4)
    assert "\n" not in str(e.value)


def test_store_dtype_and_frame_errors(tmp_path: Path):
    n = max(LENGTHS)
    gray = robot_store(tmp_path / "gray.zarr", front=np.zeros((n, H, W), np.uint8))
    with pytest.raises(DataError, match=r"task\.obs\.front: data/front has frames of shape \(32, 40\); an rgb key needs whole \(H, W, 3\)"):  # fmt: skip
        make_datasets(str(gray), task_spec(task_cfg(gray)), 8, 2, 4)


def test_lengths_and_dtypes_of_in_memory_buffers():
    """Stores refuse both on open; a buffer built in memory meets the spec's own checks."""
    from diffusion_policy.data.task_spec import check_spec

    def buffer(**data):
        return ReplayBuffer({"action": np.zeros((10, 2), np.float32), **data}, np.array([5, 10]))

    spec = task_spec(task_cfg(Path("x"), {"a": {}}, {"source": ["action"]}))
    with pytest.raises(DataError, match=r"task\.obs\.a: data/a has 9 frames but the episodes .* have 10"):  # fmt: skip
        check_spec(buffer(a=np.zeros((9, 2), np.float32)), spec)
    with pytest.raises(DataError, match=r"task\.obs\.a: data/a is <U4; a low-dim key needs numbers"):  # fmt: skip
        check_spec(buffer(a=np.array([["open"]] * 10)), spec)


@pytest.mark.parametrize(
    "task, message",
    [
        ({"obs": {"c": {"kind": "depth"}}}, r"task\.obs\.c\.kind='depth': expected low_dim or rgb"),
        ({"obs": {"c": {"kind": "rgb", "source": ["a", "b"]}}}, r"task\.obs\.c\.source=.*exactly one"),
        ({"obs": {"s": {"normalize": "zscore"}}}, r"task\.obs\.s\.normalize='zscore'"),
        ({"obs": {"s": {"crop": [4, 4]}}}, r"task\.obs\.s\.crop: only rgb keys"),
        ({"obs": {"c": {"kind": "rgb", "resize": [8, 8], "crop": [9, 8]}}}, r"task\.obs\.c\.crop=\[9, 8\] must fit"),
        ({"action": {"normalize": "zscore"}}, r"task\.action\.normalize='zscore'"),
        ({"action": {"source": []}}, r"task\.action\.source is empty"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(task, message):
    with pytest.raises(ConfigError, match=message):
        config_from_nodes([{"task": task}])


def test_identity_normalisation(store: Path):
    from diffusion_policy.models.normalizer import LinearNormalizer

    obs = {"state": {"source": ["eef_pos", "gripper[0:1]"], "normalize": "identity"}}
    train, _ = make_datasets(
        str(store), task_spec(task_cfg(store, obs, {"source": ["action"]})), 8, 2, 4
    )
    modes = train.shape_meta.normalize_modes()
    assert modes == {"action": "minmax", "state": "identity"}
    assert ShapeMeta.from_dict(train.shape_meta.to_dict()).normalize_modes() == modes
    norm = LinearNormalizer({"action": 7, "state": 7}).fit(train.normalizer_data(), mode={"state": "identity", "action": "limits"})  # fmt: skip
    x = torch.randn(3, 7)
    torch.testing.assert_close(norm.normalize("state", x), x)
    a = torch.from_numpy(train.normalizer_data()["action"])
    assert norm.normalize("action", a).abs().max() <= 1.0 + 1e-5


def test_old_meta_without_normalisation_fields_loads():
    old = {
        "obs": {"keypoints": {"shape": [20], "dtype": "float32", "kind": "low_dim"}},
        "action_dim": 2,
    }
    sm = ShapeMeta.from_dict(old)
    assert sm.normalize_modes() == {"action": "minmax", "keypoints": "minmax"}
    assert sm.to_dict() == old  # Push-T's meta.json is written as before


def test_data_info_prints_a_task_that_trains(store: Path, capsys, tmp_path: Path):
    from diffusion_policy.cli.main import main

    assert main(["data", "info", str(store)]) == 0
    out = capsys.readouterr().out
    for line in ("episodes  4", "data/front", "(32, 40, 3)", "uint8", "median 13", "max 17"):
        assert line in out
    block = yaml.safe_load(out[out.index("task:") :])["task"]
    assert block["obs"]["front"] == {"kind": "rgb", "source": ["front"]}
    assert block["obs"]["eef_pos"]["kind"] == "low_dim" and block["action"]["source"] == ["action"]
    assert "action" not in block["obs"]
    train, _ = make_datasets(
        str(store), task_spec(config_from_nodes([{"task": block}]).task), 8, 2, 4
    )
    assert train.shape_meta.obs["gripper"].shape == (2,)


SMOKE_IMAGE = """
inherit: smoke
task:
  name: two_cam
  dataset: {dataset}
  env_id: null
  obs:
    front: {{kind: rgb, source: [front], crop: [28, 36]}}
    wrist: {{kind: rgb, source: [wrist], resize: [24, 30], crop: [20, 26]}}
    state: {{kind: low_dim, source: [eef_pos, "gripper[0:1]"]}}
  action: {{source: [action], dim: 7}}
data:
  max_train_episodes: null
policy:
  encoder:
    crop_shape: [28, 36]
    resnet_width: 16
    num_keypoints: 8
    image_feature_dim: 16
train:
  batch_size: 4
  max_steps: 2
  device: cpu
  cadence: {{eval_every: 0, final_eval: false, val_every: 0, checkpoint_every: 2}}
"""


def test_train_two_cameras_end_to_end(store: Path, tmp_path: Path, one_thread):
    from diffusion_policy.checkpoint import load_policy
    from diffusion_policy.cli.main import main

    preset = tmp_path / "two_cam.yaml"
    preset.write_text(SMOKE_IMAGE.format(dataset=store))
    run = tmp_path / "run"
    assert main(["train", str(preset), f"run_dir={run}"]) == 0
    policy, cfg, meta = load_policy(run / "checkpoints" / "latest")
    assert cfg.task.env_id is None and list(cfg.task.obs) == ["front", "wrist", "state"]
    assert meta["shape_meta"]["obs"]["wrist"]["resize"] == [24, 30]
    enc = policy.obs_encoder.image_encoders
    assert enc["wrist"].resize_shape == (24, 30)
    rng = np.random.default_rng(1)
    obs = {
        "front": rng.integers(0, 256, (1, 2, H, W, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 256, (1, 2, 48, 60, 3), dtype=np.uint8),  # resized: any size
        "state": rng.normal(size=(1, 2, 7)).astype(np.float32),
    }
    with torch.no_grad():
        out = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
    assert out["action"].shape == (1, cfg.policy.n_action_steps, 7)
    assert torch.isfinite(out["action"]).all()
