"""Implicit BC: the InfoNCE loss, DFO and Langevin on analytic energies, the policy's wiring, and a
train -> eval smoke run on the real Push-T store."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusion_policy.checkpoint import load_policy, save_checkpoint
from diffusion_policy.cli.main import main as dp_main
from diffusion_policy.config import config_from_nodes, load_config
from diffusion_policy.errors import ConfigError
from diffusion_policy.policies.ibc import (
    DFOConfig,
    IBCPolicy,
    LangevinConfig,
    dfo_optimize,
    gradient_penalty,
    info_nce_loss,
    langevin_optimize,
    uniform_candidates,
)
from diffusion_policy.shapes import ObsSpec, ShapeMeta

LOW, HIGH = -torch.ones(2), torch.ones(2)
CENTRE = torch.tensor([0.3, -0.5])
WELLS = torch.tensor([[-0.5, -0.5], [0.5, 0.5]])
SHARPNESS = 800.0  # exp(-E) has std 0.025 per dimension around each minimum


def bowl(x: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) -> (B, N): one minimum at CENTRE."""
    return SHARPNESS * ((x - CENTRE) ** 2).sum(-1)


def two_wells(x: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) -> (B, N): two equally deep minima at WELLS[0] and WELLS[1]."""
    d = ((x[..., None, :] - WELLS) ** 2).sum(-1)  # (B, N, 2 wells)
    return SHARPNESS * d.min(-1).values


OPTIMIZERS = [
    pytest.param(dfo_optimize, DFOConfig(), id="dfo"),
    pytest.param(dfo_optimize, DFOConfig(noise_shrink=0.5, clamp=True), id="dfo_shrink_clamp"),
    pytest.param(langevin_optimize, LangevinConfig(), id="langevin"),
]


def _run(optimize, cfg, energy, pick: str, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    init = uniform_candidates(batch, cfg.n_samples, LOW, HIGH, g)
    return optimize(energy, init, cfg, LOW, HIGH, pick, g)


# --- the loss ------------------------------------------------------------------------------------


def test_info_nce_matches_hand_computed_cross_entropy():
    energies = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])  # positive first
    # -log softmax(-E)[0] = E_0 + log sum_j exp(-E_j)
    row0 = 0.0 + math.log(1 + math.exp(-1) + math.exp(-2))  # 0.40761
    row1 = 2.0 + math.log(math.exp(-2) + 2)  # 2.75862
    assert info_nce_loss(energies).item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    # the positive at the lowest energy by a wide margin -> loss near 0
    assert info_nce_loss(torch.tensor([[-50.0, 0.0, 0.0]])).item() < 1e-6


def test_gradient_penalty_counts_only_the_excess_over_the_margin():
    grad = torch.tensor(
        [[[0.5, -3.0], [0.2, 0.1]]]
    )  # inf-norms 3 and 0.2, l2 norms sqrt(9.25), 0.224
    assert gradient_penalty(grad, 1.0, "inf").item() == pytest.approx((2.0**2 + 0.0) / 2)
    l2 = math.sqrt(0.25 + 9.0)
    assert gradient_penalty(grad, 1.0, "l2").item() == pytest.approx(((l2 - 1) ** 2) / 2, rel=1e-6)


# --- inference on analytic energies --------------------------------------------------------------


@pytest.mark.parametrize(("optimize", "cfg"), OPTIMIZERS)
def test_argmax_finds_the_minimum_of_a_bowl(optimize, cfg):
    a = _run(optimize, cfg, bowl, "argmax", batch=16)
    assert (a - CENTRE).norm(dim=-1).max() < 0.03


@pytest.mark.parametrize(("optimize", "cfg"), OPTIMIZERS)
def test_sample_pick_is_centred_on_the_minimum_of_a_bowl(optimize, cfg):
    a = _run(optimize, cfg, bowl, "sample", batch=200)
    assert (a.mean(0) - CENTRE).norm() < 0.02
    assert (a - CENTRE).norm(dim=-1).max() < 0.15


@pytest.mark.parametrize(("optimize", "cfg"), OPTIMIZERS)
def test_sample_pick_finds_both_wells(optimize, cfg):
    a = _run(optimize, cfg, two_wells, "sample", batch=200)
    d = (a[:, None, :] - WELLS).norm(dim=-1)  # (B, 2)
    assert d.min(-1).values.max() < 0.15  # every answer sits in a well, none in between
    share = (d.argmin(-1) == 0).float().mean().item()
    assert 0.3 < share < 0.7  # and both wells are used


def test_dfo_clamp_keeps_candidates_inside_the_bounds():
    corner = torch.tensor([1.0, -1.0])

    def energy(x):
        return SHARPNESS * ((x - corner) ** 2).sum(-1)

    free = _run(dfo_optimize, DFOConfig(), energy, "sample", batch=64)
    clamped = _run(dfo_optimize, DFOConfig(clamp=True), energy, "sample", batch=64)
    assert (free.abs() > 1).any()  # the unclamped original wanders past the bounds
    assert (clamped.abs() <= 1).all()
    assert (clamped - corner).norm(dim=-1).max() < 0.15


def test_langevin_step_sizes_decay_from_step_size_towards_final():
    cfg = LangevinConfig(n_steps=10, step_size=0.1, step_size_final=1e-3, decay_power=2.0)
    eps = cfg.step_sizes()
    assert eps[0] == pytest.approx(0.1) and all(a > b for a, b in zip(eps, eps[1:]))
    assert 1e-3 < eps[-1] < 2e-3
    assert set(LangevinConfig(decay_power=0.0).step_sizes()) == {0.1}


# --- the policy ----------------------------------------------------------------------------------


def _tiny_policy(**policy: object) -> IBCPolicy:
    cfg = config_from_nodes(
        [
            {
                "policy": {
                    "name": "ibc",
                    "energy": {"hidden_dim": 16, "n_layers": 2},
                    "train_n_neg": 8,
                    "dfo": {"n_samples": 16, "n_iters": 3},
                    "langevin": {"n_samples": 8, "n_steps": 4},
                    **policy,
                }
            }
        ]
    )
    meta = ShapeMeta(obs={"keypoints": ObsSpec((4,), "float32", "low_dim")}, action_dim=2)
    pol = IBCPolicy(cfg.policy, meta)
    g = torch.Generator().manual_seed(0)
    pol.fit_normalizer(
        {
            "keypoints": torch.randn(100, 4, generator=g),
            "action": 10 * torch.rand(100, 2, generator=g),
        }
    )
    return pol


def _batch(b: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "obs": {"keypoints": torch.randn(b, 2, 4, generator=g)},
        "action": 10 * torch.rand(b, 2, 2, generator=g),
    }


def test_compute_loss_scores_the_executed_action_against_uniform_negatives():
    pol = _tiny_policy().eval()  # no dropout: energies are a pure function
    batch = _batch()
    batch.update(pol.sample_training_noise(3, torch.Generator().manual_seed(2)))
    feat = pol.obs_features(pol.normalize_obs(batch["obs"]))
    pos = pol.normalizer.normalize("action", batch["action"][:, 1])  # index To-1 = 1, Ta = 1
    pos = pos + 1e-2 * batch["ibc_pos_noise"]
    neg = -1 + 2 * batch["ibc_neg_uniform"]  # limits mode: bounds [-1, 1]
    energies = pol.energy_net(feat, torch.cat([pos[:, None], neg], 1))
    assert batch["ibc_neg_uniform"].shape == (3, 8, 2)
    assert pol.compute_loss(batch).item() == pytest.approx(info_nce_loss(energies).item(), rel=1e-6)


@pytest.mark.parametrize("inference", ["dfo", "langevin"])
def test_policy_predicts_deterministically_and_round_trips(tmp_path, inference):
    pol = _tiny_policy(inference=inference)
    batch = _batch()
    loss = pol.compute_loss(batch)
    loss.backward()  # the gradient penalty (on with langevin) is differentiable
    assert torch.isfinite(loss)
    with torch.no_grad():  # validation runs compute_loss without grad; the penalty still works
        assert torch.isfinite(pol.compute_loss(batch))

    def predict(p):
        return p.predict_action_chunk(batch["obs"], generator=torch.Generator().manual_seed(3))

    out = predict(pol)
    assert out["action"].shape == (3, 1, 2) and out["action_pred"].shape == (3, 2, 2)
    assert torch.equal(out["action_pred"][:, 1:], out["action"])
    assert torch.equal(predict(pol)["action"], out["action"])
    assert pol.training  # predict switched to eval internally and back
    lo, hi = pol.normalizer.stats("action")["min"], pol.normalizer.stats("action")["max"]
    if inference == "langevin":  # chains are clamped to the data's range
        assert ((out["action"] >= lo - 1e-4) & (out["action"] <= hi + 1e-4)).all()

    cfg = load_config("smoke_ibc", [f"policy.inference={inference}"])
    cfg.policy = pol.config
    save_checkpoint(tmp_path / "ckpt", cfg, pol.shape_meta, pol)
    again, _, _ = load_policy(tmp_path / "ckpt")
    assert torch.equal(predict(again)["action"], out["action"])


def test_langevin_negatives_train():
    pol = _tiny_policy(train_negatives="langevin")
    assert pol.config.use_grad_penalty
    batch = _batch()
    drawn = pol.sample_training_noise(3, torch.Generator().manual_seed(2))
    assert drawn["ibc_langevin_noise"].shape == (3, 4, 8, 2)  # (B, K, N, A)
    batch.update(drawn)
    pol.compute_loss(batch).backward()
    assert pol.training and all(p.grad is not None for p in pol.energy_net.parameters())


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["policy.inference=mcmc"], "policy.inference"),
        (["policy.final_pick=mode"], "policy.final_pick"),
        (["policy.train_negatives=gaussian"], "policy.train_negatives"),
        (["policy.dfo.n_samples=0"], "policy.dfo.n_samples"),
        (["policy.dfo.noise_shrink=0"], "policy.dfo.noise_shrink"),
        (["policy.langevin.step_size_final=1.0"], "policy.langevin.step_size_final"),
        (["policy.langevin.delta_clip=0"], "policy.langevin.delta_clip"),
        (["policy.energy.dropout=1.0"], "policy.energy.dropout"),
        (["policy.train_n_neg=0"], "policy.train_n_neg"),
        (["policy.grad_penalty_norm=l1"], "policy.grad_penalty_norm"),
        (["policy.unet.down_dims=[8]"], "policy.unet"),  # a diffusion key is not an IBC key
    ],
)
def test_bad_ibc_config_names_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("smoke_ibc", overrides)
    assert needle in str(e.value)


def test_grad_penalty_defaults_to_on_with_langevin_only():
    assert not load_config("smoke_ibc").policy.use_grad_penalty
    assert load_config("smoke_ibc", ["policy.inference=langevin"]).policy.use_grad_penalty
    cfg = load_config("smoke_ibc", ["policy.inference=langevin", "policy.grad_penalty=false"])
    assert not cfg.policy.use_grad_penalty


def test_paper_presets():
    p = load_config("pusht_ibc_state")
    assert (p.policy.horizon, p.policy.n_obs_steps, p.policy.n_action_steps) == (2, 2, 1)
    assert (p.policy.energy.hidden_dim, p.policy.energy.n_layers) == (1024, 4)
    assert (p.policy.train_n_neg, p.policy.dfo.n_samples, p.policy.dfo.n_iters) == (1024, 1024, 5)
    assert p.train.batch_size == 256 and not p.train.ema.enabled and p.train.optim.lr == 1e-4
    image = load_config("pusht_ibc_image")
    assert image.task.obs_type == "pixels_agent_pos" and image.train.batch_size == 128
    assert image.policy.name == "ibc"


# --- end to end on the real store ----------------------------------------------------------------


@pytest.mark.real_data
def test_train_then_eval_smoke(tmp_path, pusht_zarr):
    run = tmp_path / "run"
    assert dp_main(["train", "smoke_ibc", f"task.dataset={pusht_zarr}", f"run_dir={run}"]) == 0
    ckpt = run / "checkpoints" / "latest"
    assert (ckpt / "model.safetensors").exists()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/mean_score" in x for x in lines) and any("val/loss" in x for x in lines)
    out = tmp_path / "eval"
    argv = ["eval", str(run), "--episodes", "2", "--max-steps", "10", "--sync", "--videos", "0"]
    assert dp_main([*argv, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_episodes"] == 2 and 0.0 <= metrics["mean_score"] <= 1.0
