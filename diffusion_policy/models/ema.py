"""Exponential moving average of weights with the power warmup schedule of the paper.

decay(k) = clamp(1 - (1 + k / inv_gamma) ** -power, min_decay, max_decay), k = step - update_after_step - 1.
With power 0.75 the average stays short early (when weights move fast) and reaches 0.999 after
~10^4 steps and 0.9999 after ~2*10^5. Only trainable parameters are averaged; buffers (the
normaliser's statistics) are copied so the EMA model always carries the current normaliser.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMAModel:
    """Holds a frozen copy of `model` whose parameters track an EMA of the trained ones."""

    def __init__(
        self,
        model: nn.Module,
        power: float = 0.75,
        max_decay: float = 0.9999,
        min_decay: float = 0.0,
        inv_gamma: float = 1.0,
        update_after_step: int = 0,
    ):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay, self.min_decay = power, max_decay, min_decay
        self.inv_gamma, self.update_after_step = inv_gamma, update_after_step
        self.optimization_step = 0
        self.decay = 0.0

    def get_decay(self, step: int) -> float:
        k = max(0, step - self.update_after_step - 1)
        if k <= 0:
            return 0.0
        value = 1 - (1 + k / self.inv_gamma) ** -self.power
        return max(self.min_decay, min(value, self.max_decay))

    def next_decay(self) -> float:
        """Advance the schedule by one step and return that step's decay."""
        self.decay = self.get_decay(self.optimization_step)
        self.optimization_step += 1
        return self.decay

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        self.apply(model, 1.0 - self.next_decay())

    @torch.no_grad()
    def apply(self, model: nn.Module, weight: float | torch.Tensor) -> None:
        """ema += weight * (param - ema); weight may be a device tensor (a CUDA graph reads it)."""
        ema_params, params = [], []
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:
                ema_params.append(ema_p)
                params.append(p.detach())
            else:
                ema_p.copy_(p)
        if ema_params:
            # one fused multi-tensor op instead of a Python loop over ~100 parameters
            if isinstance(weight, torch.Tensor):  # lerp's weight is a Scalar: it would sync
                diff = torch._foreach_sub(params, ema_params)
                torch._foreach_mul_(diff, weight)
                torch._foreach_add_(ema_params, diff)
            else:
                torch._foreach_lerp_(ema_params, params, weight)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"optimization_step": self.optimization_step, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.optimization_step = int(state["optimization_step"])
        self.decay = float(state["decay"])
