"""Contract tests run for every registered policy: build, loss, shapes, determinism, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_policy.checkpoint import load_policy, save_checkpoint
from diffusion_policy.config import Config
from diffusion_policy.errors import CheckpointError, ObservationError
from diffusion_policy.registry import POLICIES
from diffusion_policy.shapes import ObsSpec, ShapeMeta

SHAPE_META = ShapeMeta(obs={"keypoints": ObsSpec((20,), "float32", "low_dim")}, action_dim=2)


def _make(name: str):
    cfg_cls, pol_cls = POLICIES[name]
    pcfg = cfg_cls.tiny()
    torch.manual_seed(0)
    policy = pol_cls(pcfg, SHAPE_META)
    rng = np.random.default_rng(0)
    policy.fit_normalizer(
        {"keypoints": rng.uniform(0, 512, (500, 20)), "action": rng.uniform(0, 512, (500, 2))}
    )
    return policy, pcfg


def _batch(pcfg, b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": {"keypoints": torch.rand(b, pcfg.n_obs_steps, 20, generator=g) * 512},
        "action": torch.rand(b, pcfg.horizon, 2, generator=g) * 512,
    }


@pytest.fixture(params=sorted(POLICIES))
def name(request) -> str:
    return request.param


def test_loss_is_finite_and_trains(name):
    policy, pcfg = _make(name)
    policy.train()
    batch = _batch(pcfg)
    loss = policy.compute_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_trainer_noise_makes_loss_deterministic(name):
    policy, pcfg = _make(name)
    policy.eval()  # no dropout: the only randomness is what the trainer hands in
    draw = getattr(policy, "sample_training_noise", None)
    if draw is None:
        pytest.skip(f"{name} draws no per-sample training noise")
    batch = _batch(pcfg)
    a = policy.compute_loss({**batch, **draw(4, torch.Generator().manual_seed(3))})
    b = policy.compute_loss({**batch, **draw(4, torch.Generator().manual_seed(3))})
    assert torch.equal(a, b)


def test_predict_shapes_and_determinism(name):
    policy, pcfg = _make(name)
    policy.eval()
    obs = _batch(pcfg, b=3)["obs"]
    out1 = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(7))
    out2 = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(7))
    assert out1["action"].shape == (3, pcfg.n_action_steps, 2)
    assert out1["action_pred"].shape[0] == 3 and out1["action_pred"].shape[-1] == 2
    assert torch.equal(out1["action"], out2["action"])
    # numpy input works the same as torch input (the env and the server hand numpy)
    out3 = policy.predict_action_chunk(
        {k: v.numpy() for k, v in obs.items()}, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(out1["action"], out3["action"])


def test_save_load_round_trip(name, tmp_path):
    policy, pcfg = _make(name)
    policy.eval()
    cfg = Config(preset="test", policy=pcfg)
    save_checkpoint(tmp_path / "ckpt", cfg, SHAPE_META, policy, meta={"step": 0})
    loaded, cfg2, meta = load_policy(tmp_path / "ckpt")
    assert cfg2.policy == pcfg and meta["step"] == 0
    obs = _batch(pcfg, b=2)["obs"]
    a = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1))["action"]
    b = loaded.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1))["action"]
    assert torch.equal(a, b)
    for k, v in policy.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_bad_observations_are_named(name):
    policy, pcfg = _make(name)
    good = _batch(pcfg, b=2)["obs"]["keypoints"]
    with pytest.raises(ObservationError, match="missing key"):
        policy.predict_action_chunk({"state": good})
    with pytest.raises(ObservationError, match=r"obs\['keypoints'\] has shape \(2, 2, 19\)"):
        policy.predict_action_chunk({"keypoints": good[..., :19]})
    with pytest.raises(ObservationError, match="NaN"):
        policy.predict_action_chunk({"keypoints": good * float("nan")})
    with pytest.raises(ObservationError, match="dict"):
        policy.predict_action_chunk(good)


def test_unfitted_normaliser_raises(name):
    cfg_cls, pol_cls = POLICIES[name]
    pcfg = cfg_cls.tiny()
    policy = pol_cls(pcfg, SHAPE_META)
    with pytest.raises(KeyError, match="never fitted"):
        policy.predict_action_chunk(_batch(pcfg, b=1)["obs"])


def test_checkpoint_of_another_config_is_refused(name, tmp_path):
    policy, pcfg = _make(name)
    cfg = Config(preset="test", policy=pcfg)
    save_checkpoint(tmp_path / "ckpt", cfg, SHAPE_META, policy)
    other = ShapeMeta(obs={"keypoints": ObsSpec((18,), "float32", "low_dim")}, action_dim=2)
    save_checkpoint(
        tmp_path / "other", cfg, other, policy
    )  # weights of a 20-d policy, meta says 18-d
    with pytest.raises(CheckpointError, match="does not match"):
        load_policy(tmp_path / "other")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_policy(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nowhere")
