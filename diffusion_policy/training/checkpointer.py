"""The run's checkpoints/: step checkpoints (latest -> the newest, the two newest kept), the best k
by an evaluation metric (rollouts: the highest mean_score; offline validation: the lowest action
MSE), and restoring a run from its latest. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion_policy.checkpoint import (
    load_state,
    point_symlink,
    read_checkpoint_meta,
    remove_checkpoint,
    save_checkpoint,
)
from diffusion_policy.config import config_to_yaml
from diffusion_policy.errors import ConfigError
from diffusion_policy.training.build import Run
from diffusion_policy.training.run_dir import clean_partial_writes, prepare_fresh, truncate_metrics

STEP_DIR = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class BestBy:
    """Which logged metric ranks checkpoints, which way, and its name in the kept copy's name."""

    key: str
    higher_is_better: bool
    label: str
    digits: str

    def tag(self, step: int, value: float) -> str:
        return f"best_step{step:08d}_{self.label}{value:{self.digits}}"


ROLLOUT_SCORE = BestBy("eval/mean_score", True, "score", ".3f")
OFFLINE_MSE = BestBy("offline/action_mse_norm", False, "mse", ".4g")


class Checkpointer:
    """Saves, prunes, keeps the best of and restores one run's checkpoints."""

    def __init__(
        self, run_dir: Path, run: Run, keep_best: int, main: bool, by: BestBy = ROLLOUT_SCORE
    ):
        self.run_dir, self.dir = Path(run_dir), Path(run_dir) / "checkpoints"
        self.run, self.keep_best_k, self.main, self.by = run, keep_best, main, by
        self.best: list[list] = []  # [value, step, tag], best first
        self.restored_meta: dict[str, Any] = {}  # meta.json of the checkpoint restored from

    def start(self, overwrite: bool = False) -> int:
        """A fresh run: its directory and config.yaml (an old run's files go when `overwrite`);
        training starts at step 0."""
        if self.main:
            prepare_fresh(self.run_dir, overwrite, config_to_yaml(self.run.cfg))
        return 0

    def save(self, step: int) -> Path | None:
        """step_N (resumable), latest -> it, then prune the older step checkpoints."""
        if not self.main:
            return None
        learner = self.run.learner
        state = {
            "step": torch.tensor(step),
            "optimizer": learner.optimizer.state_dict(),
            "lr_scheduler": learner.lr_sched.state_dict(),
            "ema": learner.ema.state_dict() if learner.ema else {},
            "torch_rng": torch.get_rng_state(),
            "best": json.dumps(self.best),
        }
        meta = {"step": step, "epoch": step / self.run.steps_per_epoch, **self.run.meta}
        path = save_checkpoint(
            self.dir / f"step_{step:08d}", self.run.cfg, self.run.shape_meta, learner.deployed,
            meta=meta, train_state=state, raw_policy=learner.policy if learner.ema else None,
        )  # fmt: skip
        point_symlink(self.dir / "latest", path)
        self.prune()
        return path

    def prune(self, keep: int = 2) -> None:
        """Delete all but the newest `keep` step checkpoints. Only step_N directories that hold a
        checkpoint are candidates, never latest's, and only the checkpoint's own files go: nothing
        else in checkpoints/ (an eval-* folder, a user's copy) is touched."""
        latest = (self.dir / "latest").resolve()
        steps = sorted(
            (int(m.group(1)), p)
            for p in self.dir.iterdir()
            if (m := STEP_DIR.fullmatch(p.name))
            and p.is_dir()
            and not p.is_symlink()
            and (p / "meta.json").is_file()
        )
        for _, old in steps[:-keep]:
            if old.resolve() != latest:
                remove_checkpoint(old)

    def keep_best(self, step: int, metrics: dict[str, Any]) -> None:
        """Keep a deployable copy of the best `keep_best` checkpoints by `self.by` (ties: the
        earlier step). A value that is not finite (diverged weights) is never kept."""
        value = metrics[self.by.key]
        if self.keep_best_k <= 0 or not self.main or not math.isfinite(value):
            return
        tag = self.by.tag(step, value)
        self.best.append([value, step, tag])
        sign = -1 if self.by.higher_is_better else 1
        self.best.sort(key=lambda x: (sign * x[0], x[1]))
        for _, _, old in self.best[self.keep_best_k :]:
            remove_checkpoint(self.dir / old)
        self.best = self.best[: self.keep_best_k]
        if any(t == tag for _, _, t in self.best):
            save_checkpoint(
                self.dir / tag, self.run.cfg, self.run.shape_meta, self.run.learner.deployed,
                meta={"step": step, **metrics},
            )  # fmt: skip

    def restore(self) -> int:
        """Continue from latest: weights, optimiser, schedule, EMA, RNG and the best list; the log
        loses the lines of the steps that will run again. Returns the step."""
        ckpt, _, self.restored_meta = read_checkpoint_meta(self.run_dir)
        if not (ckpt / "train_state" / "state.pt").exists():
            raise ConfigError(f"{ckpt} has no train_state/: it cannot be resumed")
        learner = self.run.learner
        if learner.ema is not None:
            load_state(learner.ema.model, ckpt / "model.safetensors")
            load_state(learner.policy, ckpt / "train_state" / "raw_model.safetensors")
        else:
            load_state(learner.policy, ckpt / "model.safetensors")
        state = torch.load(ckpt / "train_state" / "state.pt", map_location="cpu", weights_only=True)
        _load_optimizer(learner, state)
        if learner.ema is not None:
            learner.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        self.best = json.loads(state["best"])
        if self.main:
            clean_partial_writes(self.dir)
            truncate_metrics(self.run_dir / "metrics.jsonl", step)
        print(f"resumed {self.run_dir} at step {step}")
        return step


def _load_optimizer(learner, state: dict[str, Any]) -> None:
    optimizer, lr_sched = learner.optimizer, learner.lr_sched
    optimizer.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    # a run may resume with or without a CUDA graph, which keeps the lr as a device tensor
    graphed = optimizer.defaults.get("capturable", False)
    for g in optimizer.param_groups:
        lr = float(g["lr"])
        g["lr"] = torch.tensor(lr, device=g["params"][0].device) if graphed else lr
        g["initial_lr"] = float(g.get("initial_lr", lr))
    lr_sched.base_lrs = [float(x) for x in lr_sched.base_lrs]
