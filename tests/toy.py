"""A toy bimodal task that shows why Diffusion Policy can represent multimodal action distributions.

One constant observation; the demonstrated action chunk (T, 2) is a path that goes around an
obstacle either on the left or on the right, each with probability 1/2. A regressor trained with
MSE predicts the conditional mean (straight through the obstacle); a diffusion policy samples
either side. `tests/test_multimodality.py` and `scripts/plot_multimodality.py` share everything
here, so the figure shows exactly what the test asserts.

Vocabulary: N samples, T horizon, Da = 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_policy.policies.base import Policy
from diffusion_policy.policies.diffusion import (
    DiffusionConfig,
    DiffusionPolicy,
    UnetConfig,
    build_denoiser,
)
from diffusion_policy.policies.ibc import EnergyNetConfig, IBCConfig, IBCPolicy, LangevinConfig
from diffusion_policy.shapes import ObsSpec, ShapeMeta

OBS_KEY = "state"
ActionSampler = Callable[[int, torch.Generator], np.ndarray]  # (n, generator) -> (n, T, Da)


@dataclass
class BimodalTask:
    """Two equally likely paths around an obstacle at the origin, in (roughly) normalised units."""

    horizon: int = 8  # T
    noise_std: float = 0.05  # i.i.d. Gaussian jitter on every action coordinate
    mode_radius: float = 0.3  # an RMS distance below this counts as "at the mode"

    def mode_paths(self) -> np.ndarray:
        """(2, T, 2): mode 0 passes left (x < 0), mode 1 right; y runs from -0.8 to 0.8."""
        k = np.arange(self.horizon)
        y = np.linspace(-0.8, 0.8, self.horizon)
        x = np.sin(np.pi * (k + 1) / (self.horizon + 1))  # > 0 everywhere, peak mid-chunk
        right = np.stack([x, y], axis=-1)
        left = np.stack([-x, y], axis=-1)
        return np.stack([left, right]).astype(np.float32)

    def sample(self, n: int, seed: int) -> dict[str, Any]:
        """n demonstrations: {"obs": (n, 1, 1), "action": (n, T, 2), "mode": (n,) 0 left, 1 right}."""
        rng = np.random.default_rng(seed)
        mode = rng.permutation(np.arange(n) % 2)  # exactly balanced, so 50/50 is the target
        action = self.mode_paths()[mode] + rng.normal(0, self.noise_std, (n, self.horizon, 2))
        return {
            "obs": np.ones((n, 1, 1), np.float32),
            "action": action.astype(np.float32),
            "mode": mode,
        }

    def shape_meta(self) -> ShapeMeta:
        return ShapeMeta(obs={OBS_KEY: ObsSpec((1,), "float32", "low_dim")}, action_dim=2)

    def mode_distances(self, actions: np.ndarray) -> np.ndarray:
        """(N, T, 2) -> (N, 2) RMS distance of each chunk to each mode's path."""
        diff = actions[:, None] - self.mode_paths()[None]
        return np.sqrt((diff**2).mean(axis=(2, 3)))

    def mode_fractions(self, actions: np.ndarray) -> dict[str, float]:
        """Share of chunks within `mode_radius` of the left path, the right path, or neither."""
        d = self.mode_distances(actions)
        left = d[:, 0] < self.mode_radius
        right = d[:, 1] < self.mode_radius
        return {
            "left": float(left.mean()),
            "right": float(right.mean()),
            "neither": float((~left & ~right).mean()),
        }

    def side_score(self, actions: np.ndarray) -> np.ndarray:
        """(N, T, 2) -> (N,): projection on the mode direction; -1 left, +1 right, 0 the mean."""
        right = self.mode_paths()[1, :, 0]
        return actions[:, :, 0] @ right / float(right @ right)


def toy_unet_config() -> UnetConfig:
    """Small enough to train in seconds on a CPU, wide enough for two modes."""
    return UnetConfig(diffusion_step_embed_dim=16, down_dims=[16, 32], kernel_size=3, n_groups=8)


def make_diffusion_policy(task: BimodalTask, seed: int = 0) -> DiffusionPolicy:
    """The real DiffusionPolicy (DDPM, 100 steps, clipped, epsilon) with a tiny U-Net."""
    cfg = DiffusionConfig(
        horizon=task.horizon, n_obs_steps=1, n_action_steps=task.horizon, unet=toy_unet_config()
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DiffusionPolicy(cfg, task.shape_meta())


class MSERegressionPolicy(Policy):
    """Baseline: the same ConditionalUnet1D, fed a zero chunk at timestep 0, regressed with MSE.

    Same architecture and parameter count as the diffusion policy's denoiser, so the only
    difference is the training objective: MSE learns E[action | obs], which for two modes is their
    average.
    """

    def __init__(self, config: DiffusionConfig, shape_meta: ShapeMeta):
        super().__init__(config, shape_meta)
        obs_dim = sum(math.prod(s.shape) for s in shape_meta.obs.values())
        self.model = build_denoiser(config, shape_meta.action_dim, obs_dim)

    def _predict(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw obs -> normalised action chunk (B, T, Da)."""
        nobs = self.normalize_obs(obs)
        cond = torch.cat([nobs[k][:, : self.config.n_obs_steps] for k in nobs], dim=-1)
        cond = cond.flatten(1)  # (B, To * Do), time-major like the diffusion policy
        zeros = cond.new_zeros(cond.shape[0], self.config.horizon, self.shape_meta.action_dim)
        return self.model(zeros, 0, cond)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        target = self.normalizer.normalize("action", batch["action"])
        return F.mse_loss(self._predict(batch["obs"]), target)

    @torch.no_grad()
    def predict_action_chunk(
        self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        action_pred = self.normalizer.unnormalize("action", self._predict(self.check_obs(obs)))
        return {
            "action": action_pred[:, self.executed_slice()],
            "action_pred": action_pred,
        }


def make_mse_policy(task: BimodalTask, seed: int = 0) -> MSERegressionPolicy:
    cfg = DiffusionConfig(
        horizon=task.horizon, n_obs_steps=1, n_action_steps=task.horizon, unet=toy_unet_config()
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MSERegressionPolicy(cfg, task.shape_meta())


def make_ibc_policy(task: BimodalTask, seed: int = 0) -> IBCPolicy:
    """Implicit BC, the IBC paper's Langevin recipe: counter-examples refined by Langevin chains.

    The chunk is 16-d (T = 8 steps x 2), where uniform counter-examples are too easy to tell apart
    and derivative-free search from uniform samples does not reach the modes (docs/RESULTS.md).
    The gradient penalty is off: with it the energy stays too flat for the chains to settle.
    """
    cfg = IBCConfig(
        horizon=task.horizon,
        n_obs_steps=1,
        n_action_steps=task.horizon,
        energy=EnergyNetConfig(hidden_dim=64, n_layers=3, dropout=0.0),
        train_n_neg=8,
        train_negatives="langevin",
        inference="langevin",
        grad_penalty=False,
        langevin=LangevinConfig(n_steps=20, noise_scale=0.3),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return IBCPolicy(cfg, task.shape_meta())


@dataclass
class ToyTrainConfig:
    """Shared by the test and the figure; 5 seeds of it all split the modes within 43-57%."""

    steps: int = 300  # 200 leaves 20-30% of diffusion samples between the modes
    batch_size: int = 128
    lr: float = 1e-2  # peak; cosine-decayed to 0
    seed: int = 0  # weights' init is seeded separately by the make_* factories


def train_toy(policy: Policy, data: dict[str, Any], cfg: ToyTrainConfig) -> list[float]:
    """Fit the normaliser, then Adam on `compute_loss`; any Policy works (diffusion, MSE, IBC ...).

    Trains `policy` in place and returns the loss of every step.

    All randomness (minibatches and whatever the policy draws inside `compute_loss`) comes from
    `cfg.seed`; the global RNG is restored afterwards so callers are not affected.
    """
    obs = torch.from_numpy(data["obs"])
    action = torch.from_numpy(data["action"])
    policy.fit_normalizer({"action": data["action"], OBS_KEY: data["obs"]})
    optim = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    # Cosine decay to zero: the last steps settle the balance between the modes instead of
    # jittering it with a large step size.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=cfg.steps)
    losses = []
    policy.train()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        for _ in range(cfg.steps):
            idx = torch.randint(0, len(action), (cfg.batch_size,), generator=gen)
            loss = policy.compute_loss({"obs": {OBS_KEY: obs[idx]}, "action": action[idx]})
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            losses.append(loss.item())
    policy.eval()
    return losses


def policy_sampler(policy: Policy) -> ActionSampler:
    """Wrap a trained policy as (n, generator) -> n predicted chunks (n, T, Da) for the constant obs."""

    def sample(n: int, generator: torch.Generator) -> np.ndarray:
        obs = {OBS_KEY: torch.ones(n, policy.config.n_obs_steps, 1)}
        return policy.predict_action_chunk(obs, generator=generator)["action_pred"].numpy()

    return sample


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
