"""`dp distill CHECKPOINT`: a 1- or 2-step sampler distilled from a trained diffusion policy.

A deterministic DDIM sampler is a function noise -> action chunk for each observation. Its
map can be regressed directly (Luhman & Luhman 2021, "Knowledge distillation in iterative
generative models"): a student with the teacher's architecture, initialised from its weights, runs
a K-step DDIM (K = 1 or 2, trailing spacing, so step one starts at t = T - 1) and is trained so
that its chunk from (observation, noise) equals the teacher's N-step DDIM chunk from the same pair:

    loss = || DDIM_K[student](o, z) - DDIM_N[teacher](o, z) ||^2   (normalised action units)

Gradients flow through all K student steps. Because the noise picks the sample, a student that
fits the map keeps the teacher's modes rather than averaging them. The result is an ordinary
checkpoint whose config says `sampler: ddim, num_inference_steps: K`, so `dp eval`, `dp serve` and
`dp export` use it unchanged.

The student predicts the clean chunk (prediction_type: sample), not the noise. At t = T - 1 an
epsilon model's chunk is x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), with sqrt(abar) about 0.01:
a hundredfold amplification that DDIM's clip to [-1, 1] hides at inference but that makes the
regression's loss surface so sharp that a step along the exact gradient raises the loss (measured:
fine-tuning the epsilon student made its loss worse at learning rates from 5e-5 to 1e-3). Predicting x0 is well
conditioned at every t. The clip is left out while training, so no gradient is cut at the bounds.

The teacher's chunks are computed once for a pool of (observation, noise) pairs and reused for
several epochs: N teacher passes per pair once, instead of per step.

Why not consistency distillation: it needs a target network, an ODE-solver step per update and a
boundary parameterisation; for a 2-D action chunk the direct regression is simpler, has one loss
and no extra hyperparameters, and its cost (N teacher forwards per batch) is small next to the
data the teacher already learnt. Measured results: docs/BENCHMARKS.md "Few-step sampling".
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion_policy.checkpoint import load_policy
from diffusion_policy.config import CadenceConfig, Config, OptimConfig, TrainConfig
from diffusion_policy.errors import ConfigError, DataError
from diffusion_policy.policies.diffusion_sampling import DDIMSampler, ddim_table
from diffusion_policy.policies.sampler_names import TimestepSpacing
from diffusion_policy.training.build import Dist, Run, batch_indices, load_datasets
from diffusion_policy.training.loop import train
from diffusion_policy.training.run_dir import holds_a_run
from diffusion_policy.training.step import Learner, build_ema, build_optimizer

TRAILING = TimestepSpacing.TRAILING.value


def student_chunk(policy, table, obs: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    """The student's K-step DDIM chunk in normalised units, differentiable through every step."""
    net = DDIMSampler(policy, len(table.timesteps), table=table)
    return net.denoise(*[obs[k] for k in net.keys], noise)


def distill(
    checkpoint: str | Path,
    out: str | Path,
    steps: int = 1,
    teacher_steps: int = 8,
    teacher_spacing: str = TimestepSpacing.TRAILING,
    train_steps: int = 4000,
    batch_size: int = 64,
    lr: float = 3e-4,
    pool_size: int = 32768,
    seed: int = 0,
    device: str = "cpu",
    log_every: int = 50,
    overwrite: bool = False,
) -> Path:
    """Distill CHECKPOINT into a `steps`-step student, trained by the training loop in `out`;
    returns the student's checkpoint path."""
    teacher, cfg, _ = load_policy(checkpoint, device=device)
    if cfg.policy.name != "diffusion":
        raise ConfigError(f"{checkpoint} is a {cfg.policy.name!r} policy: distill needs a diffusion policy")  # fmt: skip
    if not 1 <= steps < teacher_steps:
        raise ConfigError(f"--steps {steps} must be at least 1 and fewer than --teacher-steps {teacher_steps}")  # fmt: skip
    if not Path(cfg.task.dataset).exists():
        raise DataError(f"the teacher's dataset {cfg.task.dataset} is missing (distillation samples its observations)")  # fmt: skip
    if holds_a_run(Path(out)) and not overwrite:
        raise ConfigError(f"--out {out} already holds a run: choose another --out, or pass --overwrite to replace it")  # fmt: skip
    # the student's run: AdamW (torch's betas), cosine with a short warm-up, clip 1, default EMA
    optim = OptimConfig(lr=lr, betas=[0.9, 0.999], lr_warmup_steps=min(100, train_steps // 10), grad_clip_norm=1.0)  # fmt: skip
    cadence = CadenceConfig(log_every=log_every, val_every=0, eval_every=0, final_eval=False, checkpoint_every=0, keep_best=0)  # fmt: skip
    scfg = student_config(cfg, steps, out)
    scfg.train = TrainConfig(seed=seed, device=device, batch_size=batch_size, max_steps=train_steps,
                             cuda_graph=False, progress=cfg.train.progress, optim=optim, cadence=cadence)  # fmt: skip
    print(f"distill {checkpoint}: DDIM-{teacher_steps} ({teacher_spacing}) -> DDIM-{steps} (trailing, "
          f"x0-prediction), pool {pool_size}, {train_steps} steps of batch {batch_size} on {device}")  # fmt: skip
    build = functools.partial(
        build_distill_run, teacher=teacher, source=checkpoint, steps=steps,
        teacher_steps=teacher_steps, teacher_spacing=teacher_spacing, pool_size=pool_size,
    )  # fmt: skip
    run_dir = train(scfg, overwrite=overwrite, build=build)
    return (run_dir / "checkpoints" / "latest").resolve()


def student_config(cfg: Config, steps: int, out: str | Path) -> Config:
    """The teacher's config with the student's sampler: K-step trailing DDIM, x0-prediction."""
    scfg = copy.deepcopy(cfg)
    scfg.policy.noise.sampler = "ddim"
    scfg.policy.noise.num_inference_steps = steps
    scfg.policy.noise.timestep_spacing = TRAILING
    scfg.policy.noise.prediction_type = "sample"
    scfg.run_dir = str(out)
    scfg.wandb.mode = "disabled"
    return scfg


class StudentLoss(nn.Module):
    """|| DDIM_K[student](o, z) - DDIM_N[teacher](o, z) ||^2 on a pool batch {obs, noise, target}."""

    def __init__(self, student_net: DDIMSampler):
        super().__init__()
        self.net = student_net

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        pred = self.net.denoise(*[batch["obs"][k] for k in self.net.keys], batch["noise"])
        return torch.nn.functional.mse_loss(pred, batch["target"])


@dataclasses.dataclass
class DistillRun(Run):
    """Batches from the pool: observation windows, their noise and the teacher's chunks."""

    pool: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def batch(self, step: int) -> dict[str, Any]:
        pool = self.pool
        j = batch_indices(len(pool["idx"]), self.global_batch, step, self.cfg.train.seed, self.d, self.device)  # fmt: skip
        obs = self.train_ds.get_batch(pool["idx"][j])["obs"]
        return {"obs": obs, "noise": pool["noise"][j], "target": pool["target"][j]}


def build_distill_run(cfg: Config, d: Dist, device: str, *, teacher, source, steps: int,
                      teacher_steps: int, teacher_spacing: str, pool_size: int) -> Run:  # fmt: skip
    """The student (the teacher's copy, x0-prediction, K-step trailing DDIM, trained through every
    step without DDIM's clip), its learner, and the pool the teacher labels once."""
    train_ds = load_datasets(cfg, device)[0].to(device)  # the pool indexes it on `device`
    teacher.set_sampler("ddim", teacher_steps, teacher_spacing)
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    student.config.noise = cfg.policy.noise
    student.set_sampler("ddim", steps, TRAILING)
    student.train()
    table = dataclasses.replace(ddim_table(student.sampler, steps), clip=None)
    t = cfg.train
    ema = build_ema(t.ema, student)
    optimizer, sched = build_optimizer(
        t.optim, student.optim_groups(t.optim.weight_decay), device, t.max_steps
    )
    loss = StudentLoss(DDIMSampler(student, steps, table=table))
    learner = Learner(student, loss, optimizer, sched, ema, grad_clip_norm=t.optim.grad_clip_norm)
    t0 = time.time()
    pool = teacher_pool(teacher, teacher_steps, train_ds, pool_size, t.seed, device)
    meta = {"distilled_from": str(Path(source).resolve()), "teacher_sampler": f"ddim-{teacher_steps}-{teacher_spacing}",
            "distill": {"steps": steps, "train_steps": t.max_steps, "batch_size": t.batch_size, "lr": t.optim.lr,
                        "pool_size": pool_size, "seed": t.seed, "teacher_s": time.time() - t0}}  # fmt: skip
    print(f"teacher chunks for the pool: {meta['distill']['teacher_s']:.0f} s", flush=True)
    return DistillRun(cfg, d, device, device, train_ds, None, teacher.shape_meta, learner,
                      t.batch_size, max(1, pool_size // t.batch_size), t.max_steps, meta, pool)  # fmt: skip


@torch.no_grad()
def teacher_pool(teacher, teacher_steps: int, train_ds, pool_size: int, seed: int, device: str) -> dict[str, torch.Tensor]:  # fmt: skip
    """Observation windows and noise drawn from (seed); the teacher's chunks for them, once."""
    net = DDIMSampler(teacher, teacher_steps)  # FiLM precomputed: N steps cost less
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.randint(0, len(train_ds), (pool_size,), generator=gen, device=device)
    shape = (pool_size, teacher.config.horizon, teacher.shape_meta.action_dim)
    noise = torch.randn(shape, generator=gen, device=device)
    target = torch.empty(shape, device=device)
    for i in range(0, pool_size, 512):
        obs = train_ds.get_batch(idx[i : i + 512])["obs"]
        raw = net(*[obs[k] for k in net.keys], noise[i : i + 512])
        target[i : i + 512] = teacher.normalizer.normalize("action", raw).clamp(-1, 1)
    return {"idx": idx, "noise": noise, "target": target}
