"""Latency-aware planning: one entry point that every planner (in-process eval, the server) calls.

`plan_chunk` returns the policy's chunk for a batch of observations, optionally continuing the plan
that is executing while it computes (`prefix`, `delay`): real-time chunking (guided inpainting of the
frozen prefix) or bidirectional decoding (best of N candidates by coherence with the prefix).
"""

from __future__ import annotations

from typing import Any

import torch

from diffusion_policy.errors import ConfigError

GUIDANCES = ("none", "rtc", "bid")


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
) -> dict[str, torch.Tensor]:
    """{"action": (B, Ta, Da), "action_pred": (B, H, Da)}.

    prefix: (B, P, Da) unnormalised actions of the executing plan for ticks t .. t+P-1, where t is the
    tick of the newest observation (the frame of `action[:, 0]`); delay d <= P: the first d of them
    execute whatever this call returns.
    """
    if guidance not in GUIDANCES:
        raise ConfigError(f"guidance={guidance!r}: expected one of {GUIDANCES}")
    if guidance == "none" or prefix is None:
        return policy.predict_action_chunk(obs, generator=generator, noise=noise)
    raise ConfigError(f"guidance={guidance!r} is not built yet")
