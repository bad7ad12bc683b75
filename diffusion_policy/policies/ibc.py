"""Implicit Behavioral Cloning (Florence et al., CoRL 2021), the Diffusion Policy paper's IBC baseline.

Sign convention: the network outputs an **energy** E(o, a) and p(a | o) ∝ exp(-E(o, a)), so lower
is better and the softmax over candidates is taken over -E. The original Diffusion Policy code
(PUSHT_SPEC.md §7) outputs logits = -E and takes the softmax of the logits directly; the two are
the same model with the output negated.

Timing (see policies/base.py): the energy scores the To newest observations together with the Ta
actions at [To-1, To-1+Ta) of the window, flattened. The paper's Push-T setting is To 2, Ta 1,
horizon 2, so the window holds (a0, a1) and a1 (the command issued after the newest obs) is scored.

Training (InfoNCE): for each sample, candidates = [positive + N(0, std²), N negatives uniform in the
normalised action bounds ([-1, 1] in limits mode)]; loss = cross-entropy of -E with the positive at
index 0 = E(positive) + log Σ_j exp(-E_j). The trainer draws this randomness (sample_training_noise).
With Langevin (inference or negatives) a gradient penalty mean(max(0, ||∇_a E|| - M)²) over all
candidates, positive included, keeps the energy smooth for gradient-based sampling (IBC paper,
appendix; on by default, `grad_penalty`), and `train_negatives: langevin` refines the uniform
counter-examples with Langevin chains on the current energy (the IBC paper's Langevin training).

Inference, vocabulary N = candidates per observation, A = Ta * Da:
  * dfo: N uniform candidates; repeat n_iters times: softmax over -E, resample with replacement
    (all but the last iteration), add Gaussian noise (std constant as the original, or shrinking by
    `noise_shrink` per iteration as the IBC paper), optionally clamp to the bounds.
  * langevin: N uniform chains, a <- a - (eps_k / 2) ∇_a E + noise_scale * sqrt(eps_k) * xi, with a
    polynomially decaying eps_k, clamped to the bounds.
  * final pick: `sample` one candidate from softmax(-E) (the original) or `argmax` (lowest energy).
DFO from uniform samples suits the paper's small A (Ta 1 x Da 2); on a 16-d chunk it does not reach
the modes, where Langevin with Langevin counter-examples does (the toy in docs/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from diffusion_policy.errors import ConfigError
from diffusion_policy.models.encoders import ObsEncoder
from diffusion_policy.policies.base import Policy, PolicyConfig
from diffusion_policy.shapes import ShapeMeta

EnergyFn = Callable[[torch.Tensor], torch.Tensor]  # candidates (B, N, A) -> energies (B, N)

# --- config --------------------------------------------------------------------------------------


def _check(cond: bool, key: str, value: Any, want: str) -> None:
    if not cond:
        raise ConfigError(f"policy.{key}={value!r}: {want}")


@dataclass
class EnergyNetConfig:
    """The energy MLP; the defaults are the original's (4 x 1024, ReLU, dropout 0.1; 3.19 M params on Push-T state)."""

    hidden_dim: int = 1024
    n_layers: int = 4  # hidden layers
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _check(self.hidden_dim >= 1, "energy.hidden_dim", self.hidden_dim, "must be >= 1")
        _check(self.n_layers >= 1, "energy.n_layers", self.n_layers, "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "energy.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class DFOConfig:
    """Derivative-free optimisation (the original's inference): sample, score, resample, perturb."""

    n_samples: int = 1024  # candidates per observation (original: pred_n_samples)
    n_iters: int = 5  # score/resample rounds (original: pred_n_iter)
    noise_std: float = 0.03  # perturbation after each resampling, normalised units
    noise_shrink: float = (
        1.0  # std multiplier per iteration: 1 = constant (original), 0.5 = IBC paper
    )
    clamp: bool = False  # clamp perturbed candidates to the action bounds (original: no)

    def __post_init__(self) -> None:
        _check(self.n_samples >= 1, "dfo.n_samples", self.n_samples, "must be >= 1")
        _check(self.n_iters >= 1, "dfo.n_iters", self.n_iters, "must be >= 1")
        _check(self.noise_std >= 0, "dfo.noise_std", self.noise_std, "must be >= 0")
        _check(
            0 < self.noise_shrink <= 1, "dfo.noise_shrink", self.noise_shrink, "must be in (0, 1]"
        )


@dataclass
class LangevinConfig:
    """Langevin MCMC on ∇_a E from uniform starts; the step size decays polynomially to step_size_final."""

    n_samples: int = 64  # chains per observation
    n_steps: int = 100
    step_size: float = 0.1  # eps_0, normalised units
    step_size_final: float = 1.0e-5
    decay_power: float = 2.0  # eps_k = final + (eps_0 - final) (1 - k/K)^power; 0 keeps eps_0
    noise_scale: float = 1.0  # 1 samples exp(-E) (for small steps); < 1 sharpens towards minima
    delta_clip: float | None = 0.1  # clip each step's move per dimension; null = no clip

    def __post_init__(self) -> None:
        _check(self.n_samples >= 1, "langevin.n_samples", self.n_samples, "must be >= 1")
        _check(self.n_steps >= 1, "langevin.n_steps", self.n_steps, "must be >= 1")
        _check(self.step_size > 0, "langevin.step_size", self.step_size, "must be > 0")
        _check(
            0 < self.step_size_final <= self.step_size,
            "langevin.step_size_final",
            self.step_size_final,
            f"must be in (0, step_size={self.step_size}]",
        )
        _check(self.decay_power >= 0, "langevin.decay_power", self.decay_power, "must be >= 0")
        _check(self.noise_scale >= 0, "langevin.noise_scale", self.noise_scale, "must be >= 0")
        _check(
            self.delta_clip is None or self.delta_clip > 0,
            "langevin.delta_clip",
            self.delta_clip,
            "must be > 0 or null",
        )

    def step_sizes(self) -> list[float]:
        """eps_k for k = 0 .. n_steps-1."""
        k = self.n_steps
        return [
            self.step_size_final
            + (self.step_size - self.step_size_final) * (1 - i / k) ** self.decay_power
            for i in range(k)
        ]


@dataclass
class IBCConfig(PolicyConfig):
    """Energy-based implicit BC; defaults are the paper's Push-T state baseline (PUSHT_SPEC.md §7)."""

    name: str = "ibc"
    horizon: int = 2
    n_obs_steps: int = 2
    n_action_steps: int = 1
    energy: EnergyNetConfig = field(default_factory=EnergyNetConfig)
    train_n_neg: int = 1024  # uniform counter-examples per sample
    positive_noise_std: float = 1.0e-2  # original: N(0, 1e-4) variance on the positive
    train_negatives: str = (
        "uniform"  # uniform | langevin (refine the uniform ones with Langevin chains)
    )
    inference: str = "dfo"  # dfo | langevin
    final_pick: str = "sample"  # sample: from softmax(-E) (original) | argmax: lowest energy
    dfo: DFOConfig = field(default_factory=DFOConfig)
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    grad_penalty: bool | None = None  # null: on iff inference or train_negatives is langevin
    grad_penalty_margin: float = 1.0  # M in max(0, ||∇_a E|| - M)^2
    grad_penalty_norm: str = "inf"  # inf | l2
    grad_penalty_weight: float = 1.0

    @classmethod
    def tiny(cls) -> IBCConfig:
        return cls(
            energy=EnergyNetConfig(hidden_dim=16, n_layers=2),
            train_n_neg=8,
            dfo=DFOConfig(n_samples=16, n_iters=2),
            langevin=LangevinConfig(n_samples=8, n_steps=4),
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.train_n_neg >= 1, "train_n_neg", self.train_n_neg, "must be >= 1")
        _check(
            self.positive_noise_std >= 0,
            "positive_noise_std",
            self.positive_noise_std,
            "must be >= 0",
        )
        for key, allowed in (
            ("inference", ("dfo", "langevin")),
            ("train_negatives", ("uniform", "langevin")),
            ("final_pick", ("sample", "argmax")),
            ("grad_penalty_norm", ("inf", "l2")),
        ):
            value = getattr(self, key)
            _check(value in allowed, key, value, f"expected one of {', '.join(allowed)}")
        _check(
            self.grad_penalty_margin >= 0,
            "grad_penalty_margin",
            self.grad_penalty_margin,
            "must be >= 0",
        )
        _check(
            self.grad_penalty_weight >= 0,
            "grad_penalty_weight",
            self.grad_penalty_weight,
            "must be >= 0",
        )

    @property
    def use_grad_penalty(self) -> bool:
        if self.grad_penalty is not None:
            return self.grad_penalty
        return "langevin" in (self.inference, self.train_negatives)


# --- the pieces, as functions of an energy -------------------------------------------------------


def info_nce_loss(energies: torch.Tensor) -> torch.Tensor:
    """energies (B, 1 + N), positive at index 0 -> mean cross-entropy of softmax(-E) at index 0."""
    target = torch.zeros(energies.shape[0], dtype=torch.long, device=energies.device)
    return F.cross_entropy(-energies, target)


def gradient_penalty(grad: torch.Tensor, margin: float, norm: str = "inf") -> torch.Tensor:
    """grad (B, N, A) = ∇_a E at the candidates -> mean over candidates of max(0, ||grad|| - margin)^2."""
    size = grad.abs().amax(dim=-1) if norm == "inf" else grad.norm(dim=-1)
    return (size - margin).clamp(min=0).square().mean()


def uniform_candidates(
    batch_size: int,
    n: int,
    low: torch.Tensor,
    high: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, N, A) uniform in the box [low, high] (each (A,))."""
    u = torch.rand(
        (batch_size, n, low.shape[-1]),
        generator=generator,
        device=generator.device if generator is not None else low.device,
    )
    return low + (high - low) * u.to(low.device)


def pick_final(
    candidates: torch.Tensor,
    energies: torch.Tensor,
    how: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """candidates (B, N, A), energies (B, N) -> (B, A): lowest energy, or one draw from softmax(-E)."""
    if how == "argmax":
        idx = energies.argmin(dim=1)
    else:
        probs = torch.softmax(-energies, dim=1)
        idx = _multinomial(probs, 1, generator)[:, 0]
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), idx]


def _multinomial(probs: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """(B, N) probabilities -> (B, n) indices with replacement, drawn on the generator's device."""
    dev = generator.device if generator is not None else probs.device
    idx = torch.multinomial(probs.to(dev), n, replacement=True, generator=generator)
    return idx.to(probs.device)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev).to(x.device)


@torch.no_grad()
def dfo_optimize(
    energy_fn: EnergyFn,
    candidates: torch.Tensor,
    cfg: DFOConfig,
    low: torch.Tensor,
    high: torch.Tensor,
    pick: str = "sample",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Derivative-free optimisation from initial candidates (B, N, A) -> chosen actions (B, A)."""
    x = candidates
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    std = cfg.noise_std
    energies = energy_fn(x)
    for _ in range(cfg.n_iters - 1):
        probs = torch.softmax(-energies, dim=1)
        x = x[rows, _multinomial(probs, x.shape[1], generator)]  # resample with replacement
        x = x + std * _randn_like(x, generator)
        if cfg.clamp:
            x = torch.maximum(torch.minimum(x, high), low)
        std *= cfg.noise_shrink
        energies = energy_fn(x)
    return pick_final(x, energies, pick, generator)


def langevin_chains(
    energy_fn: EnergyFn,
    candidates: torch.Tensor,
    cfg: LangevinConfig,
    low: torch.Tensor,
    high: torch.Tensor,
    noise: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """Run Langevin MCMC on every candidate (B, N, A); noise(k) gives step k's N(0, I) draws. Detached."""
    x = candidates.detach()
    for k, eps in enumerate(cfg.step_sizes()):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(energy_fn(x).sum(), x)
        delta = -0.5 * eps * grad + cfg.noise_scale * math.sqrt(eps) * noise(k)
        if cfg.delta_clip is not None:
            delta = delta.clamp(-cfg.delta_clip, cfg.delta_clip)
        x = torch.maximum(torch.minimum(x.detach() + delta, high), low)
    return x


def langevin_optimize(
    energy_fn: EnergyFn,
    candidates: torch.Tensor,
    cfg: LangevinConfig,
    low: torch.Tensor,
    high: torch.Tensor,
    pick: str = "sample",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Langevin chains from initial candidates (B, N, A), then the final pick -> (B, A)."""
    x = langevin_chains(
        energy_fn, candidates, cfg, low, high, noise=lambda k: _randn_like(candidates, generator)
    )
    with torch.no_grad():
        return pick_final(x, energy_fn(x), pick, generator)


# --- the model -----------------------------------------------------------------------------------


class EnergyMLP(nn.Module):
    """E(o, a) = MLP(concat(o, a)); the first layer is split so obs features are projected once per sample.

    obs_proj(o) + act_proj(a) equals Linear(concat(o, a)), initialised as that one layer would be.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_layers: int, dropout: float):
        super().__init__()
        self.obs_proj = nn.Linear(obs_dim, hidden)
        self.act_proj = nn.Linear(act_dim, hidden, bias=False)
        bound = 1.0 / math.sqrt(obs_dim + act_dim)  # torch's default for a fan_in of the concat
        for p in (self.obs_proj.weight, self.obs_proj.bias, self.act_proj.weight):
            nn.init.uniform_(p, -bound, bound)
        layers: list[nn.Module] = [nn.ReLU(), nn.Dropout(dropout)]
        for _ in range(n_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs (B, Dof), actions (B, N, A) -> energies (B, N)."""
        h = self.obs_proj(obs)[:, None, :] + self.act_proj(actions)  # (B, N, H)
        return self.body(h)[..., 0]


class IBCPolicy(Policy):
    """Observation encoder + energy MLP over (obs features, flattened Ta-step action chunk)."""

    config: IBCConfig

    def __init__(self, config: IBCConfig, shape_meta: ShapeMeta):
        super().__init__(config, shape_meta)
        self.obs_encoder = ObsEncoder(config.encoder, shape_meta)
        self.act_dim = config.n_action_steps * shape_meta.action_dim  # A
        e = config.energy
        self.energy_net = EnergyMLP(
            self.obs_encoder.output_dim * config.n_obs_steps,
            self.act_dim,
            e.hidden_dim,
            e.n_layers,
            e.dropout,
        )

    # --- helpers ---------------------------------------------------------------------------------
    def obs_features(self, nobs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised obs {key: (B, To, ...)} -> (B, To * Do), flattened time-major."""
        feats = self.obs_encoder({k: v[:, : self.config.n_obs_steps] for k, v in nobs.items()})
        return rearrange(feats, "b to d -> b (to d)")

    def action_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (low, high) of the flattened chunk, each (A,): the data's min/max mapped ([-1, 1] for limits)."""
        s = self.normalizer.stats("action")
        a = self.normalizer.normalize("action", s["min"])
        b = self.normalizer.normalize("action", s["max"])
        low, high = torch.minimum(a, b), torch.maximum(a, b)
        reps = self.config.n_action_steps
        return low.repeat(reps), high.repeat(reps)

    # --- training --------------------------------------------------------------------------------
    def sample_training_noise(
        self,
        batch_size: int,
        generator: torch.Generator | None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss's randomness: U[0, 1) for the negatives, N(0, 1) for the positive (and Langevin)."""
        device = generator.device if generator is not None else (device or self.device)
        c = self.config
        a, n = self.act_dim, c.train_n_neg
        out = {
            "ibc_neg_uniform": torch.rand((batch_size, n, a), generator=generator, device=device),
            "ibc_pos_noise": torch.randn((batch_size, a), generator=generator, device=device),
        }
        if c.train_negatives == "langevin":  # (B, K, N, A): memory grows with n_steps * train_n_neg
            shape = (batch_size, c.langevin.n_steps, n, a)
            out["ibc_langevin_noise"] = torch.randn(shape, generator=generator, device=device)
        return out

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        c = self.config
        feat = self.obs_features(self.normalize_obs(batch["obs"]))  # (B, To*Do)
        naction = self.normalizer.normalize("action", batch["action"])  # (B, T, Da)
        positive = rearrange(naction[:, self.executed_slice()], "b ta da -> b (ta da)")  # (B, A)
        drawn = (
            batch
            if "ibc_neg_uniform" in batch
            else self.sample_training_noise(positive.shape[0], None, positive.device)
        )
        low, high = self.action_bounds()
        positive = positive + c.positive_noise_std * drawn["ibc_pos_noise"]
        negatives = low + (high - low) * drawn["ibc_neg_uniform"]  # (B, N, A)
        if c.train_negatives == "langevin":
            chain_noise = drawn["ibc_langevin_noise"]
            was_training = self.training
            self.eval()  # no dropout while sampling counter-examples
            try:
                negatives = langevin_chains(
                    lambda x: self.energy_net(feat.detach(), x),
                    negatives,
                    c.langevin,
                    low,
                    high,
                    noise=lambda k: chain_noise[:, k],
                )
            finally:
                self.train(was_training)
        candidates = torch.cat([positive[:, None], negatives], dim=1)  # (B, 1 + N, A)
        if not c.use_grad_penalty:
            return info_nce_loss(self.energy_net(feat, candidates))
        # ∇_a E needs autograd even under no_grad (validation); the graph is kept only when training.
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            candidates = candidates.detach().requires_grad_(True)
            energies = self.energy_net(feat, candidates)
            (grad,) = torch.autograd.grad(energies.sum(), candidates, create_graph=keep_graph)
            loss = info_nce_loss(energies) + c.grad_penalty_weight * gradient_penalty(
                grad, c.grad_penalty_margin, c.grad_penalty_norm
            )
        return loss if keep_graph else loss.detach()

    # --- inference -------------------------------------------------------------------------------
    def sampler_settings(self) -> dict[str, Any]:
        return {**super().sampler_settings(), "inference": self.config.inference}

    def guidances(self) -> tuple[str, ...]:
        # stochastic given the generator, so best-of-N works; no denoiser to guide (no rtc)
        return ("none", "bid")

    @torch.no_grad()
    def predict_action_chunk(
        self,
        obs: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Minimise E over the chunk by DFO or Langevin; deterministic given `generator`.

        `action_pred` (B, T, Da) holds the Ta predicted steps at [To-1, To-1+Ta); IBC predicts no other
        steps, so the rest repeat the nearest predicted one (edge padding, like the dataset's windows).
        IBC starts from no single noise tensor (`noise_shape` is None), so `noise` must be None.
        """
        if noise is not None:
            raise ValueError(
                "IBCPolicy takes no initial noise (noise_shape is None); pass a generator"
            )
        c = self.config
        was_training = self.training
        self.eval()  # inference never uses dropout or random crops
        try:
            obs = self.check_obs(obs)
            feat = self.obs_features(self.normalize_obs(obs))  # (B, To*Do)
            low, high = self.action_bounds()
            search = c.dfo if c.inference == "dfo" else c.langevin
            init = uniform_candidates(feat.shape[0], search.n_samples, low, high, generator)
            optimize = dfo_optimize if c.inference == "dfo" else langevin_optimize
            best = optimize(
                lambda x: self.energy_net(feat, x), init, search, low, high, c.final_pick, generator
            )  # (B, A)
        finally:
            self.train(was_training)
        chunk = rearrange(best, "b (ta da) -> b ta da", ta=c.n_action_steps)
        action = self.normalizer.unnormalize("action", chunk)  # (B, Ta, Da)
        s = self.executed_slice()
        before = action[:, :1].expand(-1, s.start, -1)
        after = action[:, -1:].expand(-1, c.horizon - s.stop, -1)
        return {"action": action, "action_pred": torch.cat([before, action, after], dim=1)}
