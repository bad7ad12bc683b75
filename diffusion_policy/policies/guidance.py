"""Latency-aware planning: one entry point that every planner (in-process eval, the server) calls.

`plan_chunk` returns the policy's chunk for a batch of observations, optionally continuing the plan
that is executing while it computes (`prefix`, `delay`):

* **rtc** — real-time chunking (Black, Galliker, Levine 2025, arXiv 2506.07339): guided inpainting of
  the prefix at inference time. The paper guides a flow policy's velocity with the pseudo-inverse
  (PiGDM) correction J^T W (y - x1_hat), J = d x1_hat / d x_t, weighted by min(c_t / r_t^2, beta).
  A DDPM/DDIM chunk x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is the same process rescaled
  (flow time t <-> sqrt(abar) = t / sqrt(t^2 + (1 - t)^2)), so the paper's rule becomes, per step,

      x0_hat = the model's clean-chunk estimate (epsilon: (x_t - sqrt(1-abar) eps) / sqrt(abar))
      g      = VJP of W (y - x0_hat) through the model, w.r.t. x_t
      w      = min(1 / sqrt(abar (1 - abar)), beta)       (= the paper's c_t / r_t^2, clipped)
      x0'    = x0_hat + w sqrt(1 - abar) g,  eps' = eps - w sqrt(abar) g

  and the scheduler's step consumes eps' (epsilon models) or x0' (sample models). Unclipped this is
  exactly the paper's guided clean-chunk estimate at the same noise level. W is the paper's soft
  prefix schedule (`prefix_weights`): 1 on the d frozen actions, an exponential decay over the rest
  of the prefix, 0 beyond. All of it in normalised action units, the prefix aligned at index To-1.
* **bid** — bidirectional decoding (Liu et al., ICLR 2025): N candidates per row in one batched call,
  the one with the least backward-coherence loss sum_i W_i ||a_i - y_i|| wins; with a weaker
  checkpoint (`weak_policy`) the forward-contrast term of the paper is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffusion_policy.errors import ConfigError

GUIDANCES = ("none", "rtc", "bid")
RTC_MAX_GUIDANCE = 5.0  # beta, the paper's clip on the guidance weight
MAX_SAMPLES = 256  # BID candidates per row


def prefix_weights(delay: int, length: int, total: int) -> torch.Tensor:
    """(total,) the paper's soft prefix schedule: 1 on [0, delay), exponential decay on
    [delay, length), 0 from `length` on (delay 2, length 6: 1 1 .61 .36 .17 .05 0 ...)."""
    i = torch.arange(total, dtype=torch.float32)
    start = min(delay, length)
    w = ((start - 1 - i) / (length - start + 1) + 1).clamp(0, 1)
    w = w * torch.expm1(w) / (math.e - 1)
    return torch.where(i >= length, torch.zeros(()), w)


def supported_guidances(policy: Any) -> tuple[str, ...]:
    """The guidances `policy` can plan with (the policy contract's `guidances()`)."""
    fn = getattr(policy, "guidances", None)
    return tuple(fn()) if callable(fn) else ("none",)


def check_plan_args(
    policy: Any,
    rows: int,
    prefix_shape: tuple[int, ...] | None,
    delay: int,
    guidance: str,
    n_samples: int,
    max_samples: int = MAX_SAMPLES,
) -> None:
    """Raise ConfigError naming the argument that does not fit `policy`."""
    limits = PlanLimits.of(policy, max_samples)
    check_plan_fields(limits, rows, prefix_shape, delay, guidance, n_samples)


@dataclass(frozen=True)
class PlanLimits:
    """What a plan request is checked against (a policy's, or a server's metadata)."""

    horizon: int
    n_obs_steps: int
    action_dim: int
    guidances: tuple[str, ...]
    max_samples: int = MAX_SAMPLES
    policy_name: str = "the policy"

    @classmethod
    def of(cls, policy: Any, max_samples: int = MAX_SAMPLES) -> PlanLimits:
        """The limits of `policy` (in-process planning and the server check the same ones)."""
        c = policy.config
        return cls(
            c.horizon,
            c.n_obs_steps,
            policy.shape_meta.action_dim,
            supported_guidances(policy),
            max_samples,
            type(policy).__name__,
        )


def check_plan_fields(
    lim: PlanLimits,
    rows: int,
    prefix_shape: tuple[int, ...] | None,
    delay: Any,
    guidance: Any,
    n_samples: Any,
) -> None:
    """Raise ConfigError naming the field (guidance, delay, n_samples, prefix) that is out of bounds."""
    if not isinstance(guidance, str) or guidance not in GUIDANCES:
        raise ConfigError(f"guidance={_short(repr(guidance))}: expected one of {GUIDANCES}")
    if guidance not in lim.guidances:
        raise ConfigError(
            f"guidance={guidance!r} is not supported by {lim.policy_name} (it supports {lim.guidances})"
        )
    span = lim.horizon - lim.n_obs_steps
    if not _is_int(delay) or not (delay == 0 or 0 < delay < span):  # d = 0 always (IBC: span 0)
        raise ConfigError(
            f"delay={_short(repr(delay))}: must be an int in [0, horizon - n_obs_steps = {span})"
        )
    if not _is_int(n_samples) or not 1 <= n_samples <= lim.max_samples:
        raise ConfigError(
            f"n_samples={_short(repr(n_samples))}: must be an int in [1, {lim.max_samples}]"
        )
    if prefix_shape is None:
        return
    if len(prefix_shape) != 3 or prefix_shape[0] != rows or prefix_shape[2] != lim.action_dim:
        raise ConfigError(
            f"prefix has shape {tuple(prefix_shape)}, expected (B={rows}, P, action_dim={lim.action_dim})"
        )
    if not delay <= prefix_shape[1] <= span + 1:
        raise ConfigError(
            f"prefix holds P={prefix_shape[1]} actions: need delay={delay} <= P <= "
            f"horizon - n_obs_steps + 1 = {span + 1}"
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _short(text: str, limit: int = 40) -> str:
    """A repr cut short, so an error never echoes unbounded input."""
    return text if len(text) <= limit else f"{text[:limit]}..."


@torch.no_grad()
def plan_chunk(
    policy: Any,
    obs: dict[str, torch.Tensor],
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    delay: int = 0,
    guidance: str = "none",
    n_samples: int = 16,
    max_guidance: float = RTC_MAX_GUIDANCE,
    weak_policy: Any | None = None,
    bid_k: int | None = None,
) -> dict[str, torch.Tensor]:
    """{"action": (B, Ta, Da), "action_pred": (B, H, Da)}.

    prefix: (B, P, Da) unnormalised actions of the executing plan for ticks t .. t+P-1, where t is the
    tick of the newest observation (the frame of `action[:, 0]`); delay d <= P: the first d of them
    execute whatever this call returns. Without a prefix (or P = 0) every guidance is plain sampling.
    `noise`: the policy's `noise_shape(B)`, except for bid: (B, n_samples, H, Da), row b's candidates.
    rtc always runs the eager sampling loop, whatever inference backend is configured (the guidance
    differentiates through the model at every step). bid's forward contrast runs when `weak_policy`
    (a weaker checkpoint of the same task) is given, with its `bid_k` (default n_samples // 2) best.
    """
    obs = policy.check_obs(obs)
    rows = next(iter(obs.values())).shape[0]
    shape = None if prefix is None else tuple(prefix.shape)
    check_plan_args(policy, rows, shape, delay, guidance, n_samples)
    if guidance == "bid":
        return _bid(policy, obs, generator, noise, prefix, delay, n_samples, weak_policy, bid_k)
    if guidance == "none" or prefix is None or prefix.shape[1] == 0:
        return policy.predict_action_chunk(obs, generator=generator, noise=noise)
    return _rtc(policy, obs, generator, noise, prefix, delay, max_guidance)


def _aligned(policy: Any, prefix: torch.Tensor, delay: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised prefix on the horizon (B, H, Da), and its weights (H, 1), both at index To-1."""
    c = policy.config
    start, p = c.n_obs_steps - 1, prefix.shape[1]
    y = torch.zeros(prefix.shape[0], c.horizon, prefix.shape[2], device=policy.device)
    y[:, start : start + p] = policy.normalizer.normalize(
        "action", prefix.to(policy.device).float()
    )
    w = torch.zeros(c.horizon, device=policy.device)
    w[start:] = prefix_weights(delay, p, c.horizon - start).to(policy.device)
    return y, w[:, None]


def _rtc(
    policy: Any,
    obs: dict[str, torch.Tensor],
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
    prefix: torch.Tensor,
    delay: int,
    max_guidance: float,
) -> dict[str, torch.Tensor]:
    y, weights = _aligned(policy, prefix, delay)
    cond = policy.condition(policy.normalize_obs(obs))
    guide = RTCGuide(policy, cond, y, weights, max_guidance)
    naction = policy.conditional_sample(cond, generator=generator, noise=noise, guide=guide)
    action_pred = policy.normalizer.unnormalize("action", naction)
    return {"action": action_pred[:, policy.executed_slice()], "action_pred": action_pred}


class RTCGuide:
    """The guided model output at one denoising step (see the module doc): called by
    DiffusionPolicy.conditional_sample in place of the model, returns what the scheduler consumes."""

    def __init__(
        self,
        policy: Any,
        cond: torch.Tensor,
        target: torch.Tensor,
        weights: torch.Tensor,
        max_guidance: float = RTC_MAX_GUIDANCE,
    ):
        self.policy, self.cond, self.target, self.weights = policy, cond, target, weights
        self.max_guidance = max_guidance
        self.epsilon = policy.config.noise.prediction_type == "epsilon"
        self.alphas_cumprod = policy.sampler.alphas_cumprod

    def weight(self, abar: float) -> float:
        """min(c_t / r_t^2, beta) = min(1 / sqrt(abar (1 - abar)), beta); beta at abar = 0 or 1."""
        denom = math.sqrt(max(abar * (1 - abar), 0.0))
        return self.max_guidance if denom == 0 else min(1 / denom, self.max_guidance)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = float(self.alphas_cumprod[int(t)])
        sa, s1a = math.sqrt(abar), math.sqrt(1 - abar)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = self.policy.model(xg, t, self.cond)
            x0 = (xg - s1a * out) / sa if self.epsilon else out
            error = (self.target - x0.detach()) * self.weights
            (g,) = torch.autograd.grad(x0, xg, grad_outputs=error)
        w = self.weight(abar)
        out = out.detach()
        return out - w * sa * g if self.epsilon else out + w * s1a * g


def _candidates(
    policy: Any, obs: dict[str, torch.Tensor], n: int, generator: torch.Generator | None, noise
) -> torch.Tensor:
    """(B, n, H, Da): n chunks per row from one batched call (rows repeated, candidates contiguous)."""
    rows = next(iter(obs.values())).shape[0]
    big = {k: v.repeat_interleave(n, dim=0) for k, v in obs.items()}
    flat = None if noise is None else noise.reshape(rows * n, *noise.shape[2:])
    pred = policy.predict_action_chunk(big, generator=generator, noise=flat)["action_pred"]
    return pred.reshape(rows, n, *pred.shape[1:])


def _backward_loss(chunks: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, n): sum_i W_i ||a_i - y_i|| over the horizon (W is 0 outside the prefix)."""
    return ((chunks - y[:, None]).norm(dim=-1) * weights[:, 0]).sum(-1)


def _bid(
    policy: Any,
    obs: dict[str, torch.Tensor],
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
    prefix: torch.Tensor | None,
    delay: int,
    n: int,
    weak_policy: Any | None,
    bid_k: int | None,
) -> dict[str, torch.Tensor]:
    rows = next(iter(obs.values())).shape[0]
    want = None if policy.noise_shape(1) is None else (rows, n, *policy.noise_shape(1)[1:])
    if noise is not None and tuple(noise.shape) != want:
        raise ConfigError(
            f"bid noise has shape {tuple(noise.shape)}, expected {want} (B, n_samples, H, Da)"
        )
    if prefix is None or prefix.shape[1] == 0:  # nothing to be coherent with: candidate 0
        first = None if noise is None else noise[:, 0]
        return policy.predict_action_chunk(obs, generator=generator, noise=first)
    if noise is None and want is not None:  # drawn once: the weak policy's candidates share it
        device = generator.device if generator is not None else policy.device
        noise = torch.randn(want, generator=generator, device=device)
    y, weights = _aligned(policy, prefix, delay)
    norm = policy.normalizer
    strong = norm.normalize("action", _candidates(policy, obs, n, generator, noise))
    loss = _backward_loss(strong, y, weights)
    if weak_policy is not None:
        weak = norm.normalize("action", _candidates(weak_policy, obs, n, generator, noise))
        loss = loss + _forward_contrast(strong, weak, loss, _backward_loss(weak, y, weights), bid_k)
    best = loss.argmin(dim=1)
    action_pred = norm.unnormalize("action", strong[torch.arange(rows), best])
    return {"action": action_pred[:, policy.executed_slice()], "action_pred": action_pred}


def _forward_contrast(
    strong: torch.Tensor,
    weak: torch.Tensor,
    strong_loss: torch.Tensor,
    weak_loss: torch.Tensor,
    k: int | None,
) -> torch.Tensor:
    """(B, n) the paper's forward term: distance to the k most coherent strong candidates (positives)
    minus distance to the k most coherent weak ones (negatives), over the whole chunk, / n."""
    n = strong.shape[1]
    k = max(1, n // 2) if k is None else min(max(1, k), n)
    pos = strong.gather(1, _top(strong_loss, k, strong))
    neg = weak.gather(1, _top(weak_loss, k, weak))
    d_pos = (strong[:, :, None] - pos[:, None]).norm(dim=-1).sum(dim=(2, 3))
    d_neg = (strong[:, :, None] - neg[:, None]).norm(dim=-1).sum(dim=(2, 3))
    return (d_pos - d_neg) / n


def _top(loss: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
    """Gather index (B, k, H, Da) of the k smallest losses per row."""
    idx = loss.topk(k, dim=1, largest=False).indices
    return idx[:, :, None, None].expand(-1, -1, *like.shape[2:])
