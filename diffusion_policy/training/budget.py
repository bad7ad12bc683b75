"""A time-budgeted run (train.budget_min): the lr schedule and the stopping point follow the
fraction of the wall-clock budget used rather than a step count, so a run finishes its cosine
schedule, and its final evaluation, in the budget on a slow machine and a fast one alike.

The warm-up stays in steps (train.optim.lr_warmup_steps: it is about the optimiser, not the
clock); after it the schedule's shape (cosine, linear, constant) is a function of the time
fraction. The time spent is saved in each checkpoint, so a resumed run continues from the time
already used, not from a fresh budget. The steps reached depend on the machine's speed: a
budgeted run is not bit-for-bit reproducible across machines (a step-based run is).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from diffusion_policy.config import TrainConfig
from diffusion_policy.errors import ConfigError

Clock = Callable[[], float]
# the schedule's shape after the warm-up, as a function of the training time fraction in [0, 1]
SHAPES: dict[str, Callable[[float], float]] = {
    "cosine": lambda f: 0.5 * (1.0 + math.cos(math.pi * f)),
    "linear": lambda f: 1.0 - f,
    "constant": lambda f: 1.0,
    "constant_with_warmup": lambda f: 1.0,
}
EVAL_FRACTION = 0.1  # reserved for the final evaluation when train.budget_eval_min is null


class Budget:
    """Wall time of a budgeted run: `used_s` (from earlier sessions of a resumed run) plus this
    session's time on `clock`. The training part is the budget less the evaluation reserve."""

    def __init__(self, minutes: float, eval_min: float, max_steps: int | None = None, clock: Clock = time.monotonic):  # fmt: skip
        self.total_s, self.eval_s = 60.0 * minutes, 60.0 * eval_min
        self.train_s, self.max_steps = self.total_s - self.eval_s, max_steps
        self.clock, self.before_s = clock, 0.0
        self.t0 = clock()

    def resume(self, used_s: float) -> None:
        """Continue a run that had already used `used_s` seconds of its budget (by its latest
        checkpoint): this session's time counts on top, from this Budget's creation."""
        self.before_s = used_s

    def used_s(self) -> float:
        return self.before_s + self.clock() - self.t0

    def fraction(self) -> float:
        """The share of the training time used, in [0, 1]."""
        return min(1.0, max(0.0, self.used_s() / self.train_s))

    def progress(self, step: int) -> float:
        """Where the schedule is: the time fraction, or step / max_steps if that is further."""
        by_steps = step / self.max_steps if self.max_steps else 0.0
        return min(1.0, max(self.fraction(), by_steps))

    def done(self) -> bool:
        return self.used_s() >= self.train_s

    def describe(self) -> str:
        return (f" | budget {self.total_s / 60:g} min ({self.eval_s / 60:g} reserved for the final "
                f"evaluation), {self.before_s / 60:.1f} used")  # fmt: skip

    def report(self, step: int) -> str:
        m = self.summary(step)
        return (f"budget {m['budget/minutes']:g} min, {m['budget/used_min']:.1f} used (the evaluation too), "
                f"{m['budget/it_s']:.2f} it/s")  # fmt: skip

    def summary(self, step: int) -> dict[str, Any]:
        used = self.used_s()
        return {"budget/minutes": self.total_s / 60, "budget/eval_reserve_min": self.eval_s / 60,
                "budget/used_min": used / 60, "budget/fraction": self.fraction(),
                "budget/steps": step, "budget/it_s": step / used if used > 0 else 0.0}  # fmt: skip


def make_budget(cfg: TrainConfig, will_evaluate: bool, clock: Clock = time.monotonic) -> Budget | None:  # fmt: skip
    """The run's Budget, or None for a step-based run (train.budget_min null)."""
    if cfg.budget_min is None:
        return None
    if cfg.optim.lr_scheduler not in SHAPES:
        raise ConfigError(
            f"train.optim.lr_scheduler={cfg.optim.lr_scheduler!r} cannot follow train.budget_min: "
            f"use one of {', '.join(SHAPES)}, or set train.budget_min=null"
        )
    reserve = cfg.budget_eval_min
    if reserve is None:
        reserve = EVAL_FRACTION * cfg.budget_min if will_evaluate else 0.0
    return Budget(cfg.budget_min, reserve, cfg.max_steps, clock=clock)


def budget_lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, budget: Budget) -> Any:
    """A LambdaLR whose factor is the warm-up (by step) times the shape of the budget's progress.
    It replaces the step schedule on the same optimiser (the base lr stays its initial_lr)."""
    warmup, shape = cfg.optim.lr_warmup_steps, SHAPES[cfg.optim.lr_scheduler]
    keeps_warmup = cfg.optim.lr_scheduler != "constant"

    def factor(step: int) -> float:
        ramp = min(1.0, step / warmup) if warmup > 0 and keeps_warmup else 1.0
        return ramp * shape(budget.progress(step))

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    sched.base_lrs = [float(x) for x in sched.base_lrs]
    return sched
