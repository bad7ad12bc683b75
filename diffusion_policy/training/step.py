"""One optimiser step, the same for `dp train`, `dp distill` and the CUDA graph.

`train_step` is forward, backward, gradient clipping, AdamW and the EMA. The eager loop calls it
every step; `graph.py` captures the very same function once and replays it. The lr schedule
steps outside (its lr is a device tensor that a graph reads), so `Learner.step` is the whole
update either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffusion_policy.config import EMAConfig, OptimConfig
from diffusion_policy.models.ema import EMAModel


@dataclass
class Learner:
    """What a step updates. `loss` (the policy, its DDP wrapper, or distill's regression) is the
    module whose forward(batch) is a loss of `policy`'s weights; AdamW and the EMA update them."""

    policy: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    lr_sched: Any
    ema: EMAModel | None
    amp: bool = False  # bf16 autocast of the forward pass
    grad_clip_norm: float | None = None
    cuda_graph: bool = False  # capture train_step at the first call and replay it after
    _graphed: Any = field(default=None, repr=False)

    @property
    def deployed(self) -> nn.Module:
        """The weights a checkpoint deploys: the EMA's when there is one."""
        return self.ema.model if self.ema is not None else self.policy

    def step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimiser step and one lr-schedule step; returns the (detached) loss."""
        self.loss.train()  # validation and evaluation leave the weights in eval mode
        if self.cuda_graph and self._graphed is None:
            from diffusion_policy.training.graph import GraphedTrainStep

            self._graphed = GraphedTrainStep(self, batch, train_step)
        loss = self._graphed(batch) if self._graphed is not None else train_step(self, batch)
        self.lr_sched.step()
        return loss


def train_step(
    learner: Learner, batch: dict[str, Any], ema_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """forward, backward, clip, AdamW, EMA. A graph passes `ema_weight`, the device tensor it
    reads the EMA weight from (eager: the EMA computes it); autocast then keeps no cast cache."""
    graphed = ema_weight is not None
    device_type = next(learner.policy.parameters()).device.type
    with torch.autocast(
        device_type, torch.bfloat16, enabled=learner.amp, cache_enabled=not graphed
    ):
        loss = learner.loss(batch)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if learner.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(learner.policy.parameters(), learner.grad_clip_norm)
    learner.optimizer.step()
    if learner.ema is not None:
        if graphed:
            learner.ema.apply(learner.policy, ema_weight)
        else:
            learner.ema.step(learner.policy)
    return loss.detach()


def build_ema(cfg: EMAConfig, policy: nn.Module) -> EMAModel | None:
    return EMAModel(policy, power=cfg.power, max_decay=cfg.max_decay) if cfg.enabled else None


def build_optimizer(
    cfg: OptimConfig,
    params: Iterable[nn.Parameter] | list[dict[str, Any]],
    device: str,
    total_steps: int,
    capturable: bool = False,
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over `params` (or the parameter groups a policy's `optim_groups` gives) and its
    diffusers lr schedule over `total_steps`. A graphed step needs a capturable optimiser whose lr
    is a device tensor."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        params, lr=torch.tensor(cfg.lr, device=device) if capturable else cfg.lr,
        betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
        fused=device.startswith("cuda"), capturable=capturable,
    )  # fmt: skip
    sched = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=total_steps,
    )
    sched.base_lrs = [float(x) for x in sched.base_lrs]  # floats even where lr is a tensor
    return optimizer, sched
