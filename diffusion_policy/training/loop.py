"""The one training loop for every policy: `dp train PRESET [key=value ...]`.

Reads top to bottom like nanoGPT's loop: build the run (build.py: data, policy, EMA, optimiser,
schedule), then for each step gather a batch by index (the dataset can sit on the device), take
one optimiser step (step.py), and now and then log, validate, checkpoint (checkpointer.py) and
evaluate. Randomness is a function of (seed, step), so a resumed run continues bit-for-bit and a
run on N processes (torchrun) sees the same samples and noise as one process with an N-times
larger batch.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from diffusion_policy.config import Config, TrainConfig, to_dict
from diffusion_policy.errors import ConfigError, UserError
from diffusion_policy.evaluation.rollout import EvalError
from diffusion_policy.threads import adapt_threads, configure_threads, thread_metrics
from diffusion_policy.training.budget import Clock, budget_lr_schedule, make_budget
from diffusion_policy.training.build import (
    Dist,
    Run,
    _use_cuda_graph,
    batch_indices,
    build_run,
    init_distributed,
    pick_device,
    seed_everything,
    step_generator,
    to_device,
)
from diffusion_policy.training.checkpointer import (
    OFFLINE_MSE,
    ROLLOUT_SCORE,
    BestBy,
    Checkpointer,
)
from diffusion_policy.training.run_dir import check_fresh, default_run_dir, resume_run_dir

# the loop's pieces, importable from here as before the split into build/step/checkpointer
__all__ = ["Dist", "Run", "_use_cuda_graph", "batch_indices", "step_generator", "train", "validate"]


def train(
    cfg: Config,
    resume: str | Path | None = None,
    overwrite: bool = False,
    build: Callable[[Config, Dist, str], Run] = build_run,
    clock: Clock = time.monotonic,
) -> Path:
    """Train `cfg` (or continue the run in `resume`); returns the run directory. `overwrite`
    replaces a run already in cfg.run_dir; `build` makes the run (`dp distill` passes its own);
    `clock` times a budgeted run (train.budget_min; tests pass a fake one)."""
    t, c = cfg.train, cfg.train.cadence
    d = init_distributed(t.device)
    device = pick_device(t.device, d)
    configure_threads(t.num_threads)  # torch is loaded: this sets its threads
    run_dir = resume_run_dir(resume) if resume else check_fresh(default_run_dir(cfg), overwrite)
    budget = make_budget(t, c.final_eval, clock)  # from here: building the run counts too
    if budget is not None and d.world > 1:  # each rank's clock would give its own lr
        raise ConfigError("train.budget_min is for one process: with torchrun set train.max_steps")
    seed_everything(t.seed + d.rank)
    run = build(cfg, d, device)
    check_offline(run)
    if budget is not None:  # before restoring, which loads the schedule's state into it
        run.learner.lr_sched = budget_lr_schedule(run.learner.optimizer, t, budget)
    ckpt = Checkpointer(run_dir, run, c.keep_best, d.main, best_by(cfg))
    step = ckpt.restore() if resume else ckpt.start(overwrite)
    if budget is not None and resume:
        budget.resume(float(ckpt.restored_meta.get("budget_used_s", 0.0)))
    if d.main:
        print(run.describe(run_dir) + (budget.describe() if budget else ""))

    def save(at: int) -> None:
        if budget is not None:
            run.meta["budget_used_s"] = budget.used_s()
        ckpt.save(at)

    log = MetricsLog(run_dir, cfg, d.main, None if budget and t.max_steps is None else run.total_steps, step)  # fmt: skip
    with StopRequest(t, d, device) as stop, log:
        if c.eval_first and step == 0 and d.main:
            log.log(step, evaluation_metrics(run, run_dir, step))
        while step < run.total_steps:
            adapt_threads()  # fewer torch threads while other processes keep cores busy
            loss = run.learner.step(run.batch(step))
            step += 1
            log.train_step(step, loss, run)
            if c.val_every and step % c.val_every == 0 and d.main:
                log.log(step, validate(run))
            stopping = stop.requested(step) or budget is not None and budget.done()
            last = step == run.total_steps or stopping
            # checkpoint before evaluating, so a failed evaluation never costs the trained weights
            saved = c.checkpoint_every and step % c.checkpoint_every == 0 or last
            if saved:
                save(step)
            evaluating = d.main and (
                c.eval_every and step % c.eval_every == 0 or last and c.final_eval
            )
            if evaluating:
                evaluate_and_keep_best(run, run_dir, step, log, ckpt)
            if evaluating and not last and budget is not None and budget.done():
                # a periodic evaluation used up the budget: it is the final one, not a second
                # evaluation of the same weights one step later
                stopping = True
                if not saved:
                    save(step)
            if stop.agreed(stopping):
                break
        if budget is not None and d.main:
            log.log(step, budget.summary(step))
    if d.main:
        minutes = (time.time() - log.t_start) / 60
        spent = f" ({budget.report(step)})" if budget else ""
        print(f"done: {step} steps in {minutes:.1f} min{spent}; checkpoint {run_dir / 'checkpoints' / 'latest'}")  # fmt: skip
    return run_dir


class StopRequest:
    """When to stop early: Ctrl-C (SIGINT) or SIGTERM finish the current step, checkpoint and stop
    (a second one aborts without saving); so do train.time_limit_min and train.stop_at_step. With
    several processes, one process's request stops them all (an all-reduce each step)."""

    def __init__(self, cfg: TrainConfig, d: Dist, device: str):
        self.time_limit_min, self.stop_at_step = cfg.time_limit_min, cfg.stop_at_step
        self.d, self.device = d, device
        self.signalled = False
        self.t_start = time.time()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if self.d.main:
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.t_start = time.time()
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.signalled:
            raise KeyboardInterrupt
        self.signalled = True
        print("\nstopping after this step (again to abort without saving)")

    def requested(self, step: int) -> bool:
        """This process's view after `step`: a signal, the time limit or stop_at_step."""
        limit = self.time_limit_min
        out_of_time = limit is not None and (time.time() - self.t_start) > 60 * limit
        at_step = self.stop_at_step is not None and step >= self.stop_at_step
        return self.signalled or out_of_time or at_step

    def agreed(self, local: bool) -> bool:
        """Whether every process stops now: any one's request stops all."""
        if self.d.world > 1:
            flag = torch.tensor([int(local)], device=self.device)
            dist.all_reduce(flag)
            local = bool(flag.item())
        return local


class MetricsLog:
    """metrics.jsonl (one JSON object per event), wandb when enabled, and the progress bar."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool, total: int, initial: int):
        self.path = run_dir / "metrics.jsonl"
        self.enabled, self.total = enabled, total
        self.log_every = cfg.train.cadence.log_every
        self.wandb = _init_wandb(run_dir, cfg) if enabled else None
        self.bar = None
        if enabled and cfg.train.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True
            )
        self.t_start = time.time()
        self._loss: Any = 0.0
        self._n = 0

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror or e}") from None
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in values.items() if isinstance(v, int | float)}, step=step
            )

    def train_step(self, step: int, loss: torch.Tensor, run: Run) -> None:
        """Average the loss over each logging window; log it with the lr, epoch and EMA decay."""
        if not self.enabled:
            return
        self._loss, self._n = self._loss + loss, self._n + 1
        if self.bar:
            self.bar.update(1)
        if step % self.log_every != 0 and step != self.total:
            return
        mean_loss = float(self._loss) / self._n
        self._loss, self._n = 0.0, 0
        lr = float(run.learner.lr_sched.get_last_lr()[0])
        if self.bar:
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        ema = run.learner.ema
        self.log(step, {"train/loss": mean_loss, "train/lr": lr, "train/epoch": step / run.steps_per_epoch,
                        "train/ema_decay": ema.decay if ema else 0.0, "time/elapsed_s": time.time() - self.t_start,
                        **thread_metrics()})  # fmt: skip

    def say(self, msg: str) -> None:
        (self.bar.write if self.bar else print)(msg)


def _init_wandb(run_dir: Path, cfg: Config) -> Any:
    if cfg.wandb.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    try:
        import wandb

        return wandb.init(
            project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode,
            dir=str(run_dir), name=run_dir.name, config=to_dict(cfg), resume="allow",
            id=run_dir.name.replace("/", "-")[-64:],
        )  # fmt: skip
    except Exception as e:  # never required
        print(f"wandb disabled: {type(e).__name__}: {e}")
        return None


def best_by(cfg: Config) -> BestBy:
    """Rollouts rank checkpoints by mean_score; a task without a simulator by the held-out MSE."""
    return ROLLOUT_SCORE if cfg.task.env_id else OFFLINE_MSE


def check_offline(run: Run) -> None:
    """A task without a simulator is evaluated on held-out episodes: there must be some."""
    c = run.cfg.train.cadence
    if run.cfg.task.env_id or not (c.eval_every or c.final_eval or c.eval_first):
        return
    if run.val_ds is None:
        raise ConfigError(
            f"task.env_id is null, so the run is evaluated on held-out episodes, but data.val_ratio="
            f"{run.cfg.data.val_ratio} holds out none: set data.val_ratio (e.g. 0.05), or set "
            "train.cadence.eval_every=0 and train.cadence.final_eval=false to train without evaluating"
        )


def evaluation_metrics(run: Run, run_dir: Path, step: int) -> dict[str, Any]:
    """Rollouts where the task has an env; else the offline validation on held-out episodes."""
    if run.cfg.task.env_id:
        return rollout_metrics(run, run_dir, step)
    return offline_eval_metrics(run)


def offline_eval_metrics(run: Run) -> dict[str, Any]:
    """evaluation/offline.py's metrics of the deployed weights on the held-out episodes, seeded
    with train.seed and batched by train.batch_size, as `dp eval` scores the checkpoint."""
    from diffusion_policy.evaluation.offline import flat, offline_metrics

    t = run.cfg.train
    m = offline_metrics(run.learner.deployed, run.val_ds, t.batch_size, t.seed, run.device)
    return flat(m)


def rollout_metrics(run: Run, run_dir: Path, step: int) -> dict[str, Any]:
    """Roll the deployed weights out on cfg.eval. Sampling is seeded with train.seed, the seed
    `dp eval` uses by default for a checkpoint, so both score a checkpoint the same."""
    from diffusion_policy.evaluation.rollout import Actor, evaluate

    cfg, deployed = run.cfg, run.learner.deployed
    deployed.eval()
    m = evaluate(
        Actor(deployed, seed=cfg.train.seed),
        cfg.task,
        cfg.eval,
        out_dir=run_dir / "eval" / f"step_{step:08d}",
        progress=cfg.train.progress,
    )
    return {
        "eval/mean_score": m["mean_score"],
        "eval/success_rate": m["success_rate"],
        **{f"eval/{k}": m[k] for k in ("mean_final_coverage", "p1_rate", "p2_rate") if k in m},
    }


def evaluate_and_keep_best(
    run: Run, run_dir: Path, step: int, log: MetricsLog, ckpt: Checkpointer
) -> None:
    """Evaluate, log, and keep the weights if among the best. A failed evaluation is reported and
    training goes on: the step's checkpoint can be evaluated later."""
    try:
        m = evaluation_metrics(run, run_dir, step)
    except EvalError as e:
        print(f"step {step}: evaluation failed: {e}")
        log.log(step, {"eval/error": str(e)})
        return
    log.log(step, m)
    if "eval/mean_score" in m:
        log.say(f"step {step}: eval mean_score {m['eval/mean_score']:.3f} success {m['eval/success_rate']:.2f}")  # fmt: skip
    else:
        log.say(f"step {step}: offline action_mse {m['offline/action_mse']:.4g} (normalised {m['offline/action_mse_norm']:.4g}) loss {m['offline/loss']:.4f}")  # fmt: skip
    ckpt.keep_best(step, m)


@torch.no_grad()
def validate(run: Run, max_batches: int = 8) -> dict[str, float]:
    """Loss on held-out episodes with fixed noise, and the MSE of sampled executed actions on a train batch."""
    from diffusion_policy.evaluation.offline import heldout_loss

    policy, val_ds, train_ds = run.learner.deployed, run.val_ds, run.train_ds
    policy.eval()
    out: dict[str, float] = {}
    bs, seed, device = run.cfg.train.batch_size, run.cfg.train.seed, run.device
    if val_ds is not None:
        out["val/loss"] = heldout_loss(policy, val_ds, bs, seed, device, max_batches)
    n = min(64, len(train_ds))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_ds), generator=g)[:n].to(run.data_device)
    batch = to_device(train_ds.get_batch(idx), device)
    pred = policy.predict_action_chunk(
        batch["obs"], generator=torch.Generator(device=device).manual_seed(seed)
    )
    # the executed slice [To-1, To-1+Ta): what every policy predicts (IBC predicts nothing else)
    target = batch["action"][:, policy.executed_slice()]
    out["train/action_mse"] = float(((pred["action"] - target) ** 2).mean())
    return out
