"""The one training loop for every policy: `dp train PRESET [key=value ...]`.

Reads top to bottom like nanoGPT's loop: build data, policy, optimiser and EMA; then for each step
gather a batch by index (the dataset can sit on the device), take a gradient step, update the EMA,
and now and then log, validate, evaluate and checkpoint. Randomness is a function of (seed, step),
so a resumed run continues bit-for-bit and a run on N processes (torchrun) sees the same samples
and noise as one process with an N-times larger batch.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from diffusion_policy.checkpoint import (
    load_state,
    point_symlink,
    read_checkpoint_meta,
    save_checkpoint,
)
from diffusion_policy.config import (
    Config,
    config_to_yaml,
    to_dict,
)
from diffusion_policy.data.datasets import make_pusht_datasets
from diffusion_policy.errors import ConfigError, DataError
from diffusion_policy.evaluation.rollout import EvalError
from diffusion_policy.models.ema import EMAModel
from diffusion_policy.registry import policy_class

# --- setup helpers -------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, d: Dist) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and d.world > 1:
        name = f"cuda:{d.local_rank}"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={name!r} but CUDA is not available (use train.device=cpu)"
            )
        index = torch.device(name).index
        torch.cuda.set_device(index if index is not None else torch.cuda.current_device())
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, device: str) -> torch.Generator:
    """A generator that depends only on (seed, step): training noise needs no saved RNG state."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % 2**63)


def batch_indices(
    n: int, global_batch: int, step: int, seed: int, d: Dist, device: str
) -> torch.Tensor:
    """This rank's share of the step's global batch; epoch e is a fixed permutation of (seed, e)."""
    per_epoch = max(1, n // global_batch)
    epoch, b = divmod(step, per_epoch)
    perm = _epoch_permutation(n, global_batch, seed, epoch)
    local = global_batch // d.world
    start = b * global_batch + d.rank * local
    return perm[start : start + local].to(device)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, global_batch: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch, drawn once per epoch rather than once per step."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    if n < global_batch:  # tiny datasets: sample with repetition so shapes stay fixed
        perm = perm.repeat(math.ceil(global_batch / n))
    return perm


def make_run_dir(cfg: Config) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


class MetricsLog:
    """metrics.jsonl (one JSON object per event) plus wandb when enabled."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        if enabled and cfg.wandb.mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(
                    project=cfg.wandb.project,
                    entity=cfg.wandb.entity,
                    mode=cfg.wandb.mode,
                    dir=str(run_dir),
                    name=run_dir.name,
                    config=to_dict(cfg),
                    resume="allow",
                    id=run_dir.name.replace("/", "-")[-64:],
                )
            except Exception as e:  # never required
                print(f"wandb disabled: {type(e).__name__}: {e}")

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in values.items() if isinstance(v, int | float)}, step=step
            )

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


# --- the loop ------------------------------------------------------------------------------------


def train(cfg: Config, resume: str | Path | None = None) -> Path:
    """Train `cfg` (or continue the run in `resume`); returns the run directory."""
    d = init_distributed(cfg.train.device)
    device = pick_device(cfg.train.device, d)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    run_dir = Path(resume) if resume else make_run_dir(cfg)
    seed_everything(cfg.train.seed + d.rank)

    # data
    p = cfg.policy
    dataset_path = Path(cfg.task.dataset)
    if not dataset_path.exists():
        raise DataError(
            f"dataset {dataset_path} not found: run `dp data fetch pusht` (or `dp data generate pusht --out {dataset_path}` offline), or set task.dataset=PATH"
        )
    train_ds, val_ds = make_pusht_datasets(
        str(dataset_path), cfg.task.obs_type, p.horizon, p.n_obs_steps, p.n_action_steps,
        val_ratio=cfg.data.val_ratio, split_seed=cfg.data.split_seed,
        max_train_episodes=cfg.data.max_train_episodes, val_episodes=cfg.data.val_episodes,
    )  # fmt: skip
    data_device = device if cfg.data.resident else "cpu"
    train_ds = train_ds.to(data_device)
    val_ds = val_ds.to(data_device) if val_ds is not None and len(val_ds) > 0 else None

    # policy, EMA, optimiser, schedule
    policy = policy_class(p.name)(p, train_ds.shape_meta)
    policy.fit_normalizer(train_ds.normalizer_data())
    policy.to(device)
    ema = (
        EMAModel(policy, power=cfg.train.ema_power, max_decay=cfg.train.ema_max_decay)
        if cfg.train.use_ema
        else None
    )
    model: torch.nn.Module = policy
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[d.local_rank] if device.startswith("cuda") else None
        )
    global_batch = cfg.train.batch_size * d.world
    steps_per_epoch = max(1, len(train_ds) // global_batch)
    total_steps = (
        cfg.train.max_steps
        if cfg.train.max_steps is not None
        else cfg.train.num_epochs * steps_per_epoch
    )
    use_graph = _use_cuda_graph(cfg, policy, device, d)
    if cfg.train.compile:
        policy.model.compile()  # in place: parameter names (and checkpoints) stay the same
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=torch.tensor(cfg.train.lr, device=device) if use_graph else cfg.train.lr,
        betas=tuple(cfg.train.betas), eps=cfg.train.eps, weight_decay=cfg.train.weight_decay,
        fused=device.startswith("cuda"), capturable=use_graph,
    )  # fmt: skip
    from diffusers.optimization import get_scheduler

    lr_sched = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=total_steps,
    )
    lr_sched.base_lrs = [float(x) for x in lr_sched.base_lrs]  # floats even where lr is a tensor

    step, best = 0, []
    if resume:
        step, best = restore(run_dir, cfg, policy, ema, optimizer, lr_sched)
    elif d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    log = MetricsLog(run_dir, cfg, enabled=d.main)
    deployed = ema.model if ema else policy
    if d.main:
        n_params = sum(q.numel() for q in policy.parameters())
        print(f"run {run_dir} | {p.name} {n_params / 1e6:.2f} M params | {len(train_ds)} train windows | "
              f"{steps_per_epoch} steps/epoch | {total_steps} steps | device {device} x{d.world}"
              f"{' | CUDA graph' if use_graph else ''}{' | compiled' if cfg.train.compile else ''}")  # fmt: skip
    graphed = None

    def checkpoint(tag: str, metrics: dict[str, Any] | None = None) -> Path | None:
        if not d.main:
            return None
        state = {
            "step": torch.tensor(step),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_sched.state_dict(),
            "ema": ema.state_dict() if ema else {},
            "torch_rng": torch.get_rng_state(),
            "best": json.dumps(best),
        }
        path = save_checkpoint(
            run_dir / "checkpoints" / tag, cfg, train_ds.shape_meta, deployed,
            meta={"step": step, "epoch": step / steps_per_epoch, **(metrics or {})},
            train_state=state, raw_policy=policy if ema else None,
        )  # fmt: skip
        point_symlink(run_dir / "checkpoints" / "latest", path)
        return path

    def evaluate_now() -> dict[str, Any]:
        from diffusion_policy.evaluation.rollout import Actor, evaluate

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
            "eval/mean_final_coverage": m["mean_final_coverage"],
        }

    def keep_best(metrics: dict[str, Any]) -> None:
        nonlocal best
        score = metrics["eval/mean_score"]
        if cfg.train.keep_best <= 0 or not d.main:
            return
        tag = f"best_step{step:08d}_score{score:.3f}"
        best.append([score, step, tag])
        best.sort(key=lambda x: (-x[0], x[1]))
        for _, _, old in best[cfg.train.keep_best :]:
            import shutil

            shutil.rmtree(run_dir / "checkpoints" / old, ignore_errors=True)
        best = best[: cfg.train.keep_best]
        if any(t == tag for _, _, t in best):
            save_checkpoint(
                run_dir / "checkpoints" / tag,
                cfg,
                train_ds.shape_meta,
                deployed,
                meta={"step": step, **metrics},
            )

    # Ctrl-C (SIGINT) and SIGTERM finish the current step, then checkpoint and stop.
    stop = {"flag": False}

    def request_stop(signum, frame):  # noqa: ARG001
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        print("\nstopping after this step (again to abort without saving)")

    old_handlers = (
        {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        if d.main
        else {}
    )
    bar = None
    if d.main and cfg.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="it", dynamic_ncols=True)
    t_start, loss_acc, n_acc = time.time(), 0.0, 0
    try:
        if cfg.train.eval_first and step == 0 and d.main:
            log.log(step, evaluate_now())
        while step < total_steps:
            model.train()
            idx = batch_indices(len(train_ds), global_batch, step, cfg.train.seed, d, data_device)
            batch = train_ds.get_batch(idx)
            batch = {k: _to(v, device) for k, v in batch.items()}
            batch.update(_training_noise(policy, global_batch, step, cfg.train.seed, d, device))
            if use_graph:
                if graphed is None:
                    from diffusion_policy.training.graph import GraphedTrainStep

                    graphed = GraphedTrainStep(
                        policy, optimizer, ema, batch, cfg.train.amp, cfg.train.grad_clip_norm
                    )
                loss = graphed(batch, ema.next_decay() if ema else 0.0)
                lr_sched.step()
            else:
                with torch.autocast(
                    torch.device(device).type, torch.bfloat16, enabled=cfg.train.amp
                ):
                    loss = model(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip_norm)
                optimizer.step()
                lr_sched.step()
                if ema:
                    ema.step(policy)
            step += 1
            loss_acc += loss.detach()
            n_acc += 1
            if bar:
                bar.update(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                mean_loss = float(loss_acc) / n_acc
                loss_acc, n_acc = 0.0, 0
                lr = float(lr_sched.get_last_lr()[0])
                if bar:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                log.log(step, {"train/loss": mean_loss, "train/lr": lr, "train/epoch": step / steps_per_epoch,
                               "train/ema_decay": ema.decay if ema else 0.0, "time/elapsed_s": time.time() - t_start})  # fmt: skip
            if cfg.train.val_every and step % cfg.train.val_every == 0 and d.main:
                log.log(step, validate(deployed, train_ds, val_ds, cfg, device, data_device))
            out_of_time = (
                cfg.train.time_limit_min is not None
                and (time.time() - t_start) > 60 * cfg.train.time_limit_min
            ) or (cfg.train.stop_at_step is not None and step >= cfg.train.stop_at_step)
            last = step == total_steps or stop["flag"] or out_of_time
            # checkpoint before evaluating, so a failed evaluation never costs the trained weights
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 or last:
                if checkpoint(f"step_{step:08d}") is not None:
                    _prune_steps(run_dir / "checkpoints")
            periodic = cfg.train.eval_every and step % cfg.train.eval_every == 0
            if d.main and (periodic or (last and cfg.train.final_eval)):
                try:
                    m = evaluate_now()
                except (
                    EvalError
                ) as e:  # report and keep training: the checkpoint can be evaluated later
                    print(f"step {step}: evaluation failed: {e}")
                    log.log(step, {"eval/error": str(e)})
                else:
                    log.log(step, m)
                    msg = f"step {step}: eval mean_score {m['eval/mean_score']:.3f} success {m['eval/success_rate']:.2f}"
                    (bar.write if bar else print)(msg)
                    keep_best(m)
            if d.world > 1:
                flag = torch.tensor([int(stop["flag"] or out_of_time)], device=device)
                dist.all_reduce(flag)
                stop["flag"] = bool(flag.item())
            if stop["flag"] or out_of_time:
                break
    finally:
        if bar:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        log.close()
    if d.main:
        print(
            f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min; checkpoint {run_dir / 'checkpoints' / 'latest'}"
        )
    return run_dir


def _use_cuda_graph(cfg: Config, policy, device: str, d: Dist) -> bool:
    """train.cuda_graph: null = on where it applies; true insists (an error says why it can't)."""
    from diffusion_policy.training.graph import graph_unsupported_reason

    want = cfg.train.cuda_graph
    if want is False:
        return False
    reason = (
        "it needs CUDA" if not device.startswith("cuda")
        else "it is not combined with multi-process (torchrun) training" if d.world > 1
        else graph_unsupported_reason(policy)
    )  # fmt: skip
    if reason and want:
        raise ConfigError(f"train.cuda_graph=true but the step cannot be graphed: {reason}")
    return reason is None


def _to(v: Any, device: str) -> Any:
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v


def _training_noise(
    policy, global_batch: int, step: int, seed: int, d: Dist, device: str
) -> dict[str, torch.Tensor]:
    """Per-sample randomness for the whole global batch from (seed, step); this rank keeps its slice."""
    draw = getattr(policy, "sample_training_noise", None)
    if draw is None:
        return {}
    noise = draw(global_batch, step_generator(seed, step, device))
    local = global_batch // d.world
    return {k: v[d.rank * local : (d.rank + 1) * local] for k, v in noise.items()}


@torch.no_grad()
def validate(
    policy, train_ds, val_ds, cfg: Config, device: str, data_device: str, max_batches: int = 8
) -> dict[str, float]:
    """Loss on held-out episodes with fixed noise, and the MSE of sampled executed actions on a train batch."""
    policy.eval()
    out: dict[str, float] = {}
    bs = cfg.train.batch_size
    if val_ds is not None:
        losses = []
        for i in range(min(max_batches, math.ceil(len(val_ds) / bs))):
            idx = torch.arange(i * bs, min((i + 1) * bs, len(val_ds)), device=data_device)
            batch = {k: _to(v, device) for k, v in val_ds.get_batch(idx).items()}
            batch.update(
                _training_noise(policy, len(idx), 10**9 + i, cfg.train.seed, Dist(), device)
            )
            losses.append(float(policy.compute_loss(batch)))
        out["val/loss"] = float(np.mean(losses))
    n = min(64, len(train_ds))
    g = torch.Generator().manual_seed(cfg.train.seed)
    idx = torch.randperm(len(train_ds), generator=g)[:n].to(data_device)
    batch = {k: _to(v, device) for k, v in train_ds.get_batch(idx).items()}
    pred = policy.predict_action_chunk(
        batch["obs"], generator=torch.Generator(device=device).manual_seed(cfg.train.seed)
    )
    # the executed slice [To-1, To-1+Ta): what every policy predicts (IBC predicts nothing else)
    target = batch["action"][:, policy.executed_slice()]
    out["train/action_mse"] = float(((pred["action"] - target) ** 2).mean())
    return out


def restore(run_dir: Path, cfg: Config, policy, ema, optimizer, lr_sched) -> tuple[int, list]:
    ckpt, saved_cfg, meta = read_checkpoint_meta(run_dir)
    if not (ckpt / "train_state" / "state.pt").exists():
        raise ConfigError(f"{ckpt} has no train_state/: it cannot be resumed")
    if ema is not None:
        load_state(ema.model, ckpt / "model.safetensors")
        load_state(policy, ckpt / "train_state" / "raw_model.safetensors")
    else:
        load_state(policy, ckpt / "model.safetensors")
    state = torch.load(ckpt / "train_state" / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    # a run may resume with or without a CUDA graph, which keeps the lr as a device tensor
    graphed = optimizer.defaults.get("capturable", False)
    for g in optimizer.param_groups:
        lr = float(g["lr"])
        g["lr"] = torch.tensor(lr, device=g["params"][0].device) if graphed else lr
        g["initial_lr"] = float(g.get("initial_lr", lr))
    lr_sched.base_lrs = [float(x) for x in lr_sched.base_lrs]
    if ema is not None:
        ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["torch_rng"])
    step = int(state["step"])
    print(f"resumed {run_dir} at step {step}")
    return step, json.loads(state["best"])


def _prune_steps(ckpt_dir: Path, keep: int = 2) -> None:
    """Keep the newest `keep` step checkpoints (latest points at the newest); best_* are kept separately."""
    import shutil

    steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
