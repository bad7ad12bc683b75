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
import json
import time
from pathlib import Path
from typing import Any

import torch

from diffusion_policy.checkpoint import load_policy, point_symlink, save_checkpoint
from diffusion_policy.data.datasets import make_pusht_datasets
from diffusion_policy.errors import ConfigError, DataError
from diffusion_policy.models.ema import EMAModel
from diffusion_policy.policies.diffusion_sampling import DDIMSampler, ddim_table
from diffusion_policy.policies.sampler_names import TimestepSpacing
from diffusion_policy.training.loop import Dist, batch_indices


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
) -> Path:
    """Distill CHECKPOINT into a `steps`-step student; returns the student's checkpoint path."""
    teacher, cfg, meta = load_policy(checkpoint, device=device)
    if cfg.policy.name != "diffusion":
        raise ConfigError(f"{checkpoint} is a {cfg.policy.name!r} policy: distill needs a diffusion policy")  # fmt: skip
    if not 1 <= steps < teacher_steps:
        raise ConfigError(f"--steps {steps} must be at least 1 and fewer than --teacher-steps {teacher_steps}")  # fmt: skip
    dataset = Path(cfg.task.dataset)
    if not dataset.exists():
        raise DataError(f"the teacher's dataset {dataset} is missing (distillation samples its observations)")  # fmt: skip
    p = cfg.policy
    train_ds, _ = make_pusht_datasets(
        str(dataset), cfg.task.obs_type, p.horizon, p.n_obs_steps, p.n_action_steps,
        val_ratio=cfg.data.val_ratio, split_seed=cfg.data.split_seed,
        max_train_episodes=cfg.data.max_train_episodes, val_episodes=cfg.data.val_episodes,
    )  # fmt: skip
    train_ds = train_ds.to(device)

    teacher.set_sampler("ddim", teacher_steps, teacher_spacing)
    teacher.eval().requires_grad_(False)
    teacher_net = DDIMSampler(teacher, teacher_steps)  # FiLM precomputed: N steps cost less

    student = copy.deepcopy(teacher).requires_grad_(True)
    student.config.noise = dataclasses.replace(
        student.config.noise,
        prediction_type="sample",
        timestep_spacing=TimestepSpacing.TRAILING.value,
    )
    student.set_sampler("ddim", steps, TimestepSpacing.TRAILING.value)
    student.train()
    table = dataclasses.replace(ddim_table(student.sampler, steps), clip=None)
    student_net = DDIMSampler(student, steps, table=table)  # trained through, step by step
    ema = EMAModel(student)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-6)
    from diffusers.optimization import get_scheduler

    sched = get_scheduler(
        "cosine", opt, num_warmup_steps=min(100, train_steps // 10), num_training_steps=train_steps
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "metrics.jsonl", "a")
    print(f"distill {checkpoint}: DDIM-{teacher_steps} ({teacher_spacing}) -> DDIM-{steps} (trailing, "
          f"x0-prediction), pool {pool_size}, {train_steps} steps of batch {batch_size} on {device}")  # fmt: skip

    # the pool: observation windows and noise drawn from (seed), teacher chunks computed once
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(seed)
    pool_idx = torch.randint(0, len(train_ds), (pool_size,), generator=gen, device=device)
    shape = (pool_size, p.horizon, teacher.shape_meta.action_dim)
    pool_noise = torch.randn(shape, generator=gen, device=device)
    pool_target = torch.empty(shape, device=device)
    with torch.no_grad():
        for i in range(0, pool_size, 512):
            obs = train_ds.get_batch(pool_idx[i : i + 512])["obs"]
            raw = teacher_net(*[obs[k] for k in teacher_net.keys], pool_noise[i : i + 512])
            pool_target[i : i + 512] = teacher.normalizer.normalize("action", raw).clamp(-1, 1)
    teacher_s = time.time() - t0
    print(f"teacher chunks for the pool: {teacher_s:.0f} s", flush=True)

    acc, n = 0.0, 0
    for step in range(train_steps):
        j = batch_indices(pool_size, batch_size, step, seed, Dist(), device)
        obs = train_ds.get_batch(pool_idx[j])["obs"]
        pred = student_net.denoise(*[obs[k] for k in student_net.keys], pool_noise[j])
        loss = torch.nn.functional.mse_loss(pred, pool_target[j])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(student)
        acc, n = acc + float(loss.detach()), n + 1
        if (step + 1) % log_every == 0 or step + 1 == train_steps:
            row = {"step": step + 1, "loss": acc / n, "elapsed_s": time.time() - t0}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"step {step + 1}: loss {acc / n:.5f} ({time.time() - t0:.0f} s)", flush=True)
            acc, n = 0.0, 0
    log.close()
    scfg = copy.deepcopy(cfg)
    scfg.policy.noise.sampler = "ddim"
    scfg.policy.noise.num_inference_steps = steps
    scfg.policy.noise.timestep_spacing = TimestepSpacing.TRAILING.value
    scfg.policy.noise.prediction_type = "sample"
    scfg.run_dir = str(out)
    info: dict[str, Any] = {
        "step": train_steps,
        "distilled_from": str(Path(checkpoint).resolve()),
        "teacher_sampler": f"ddim-{teacher_steps}-{teacher_spacing}",
        "distill": {"steps": steps, "train_steps": train_steps, "batch_size": batch_size, "lr": lr,
                    "pool_size": pool_size, "seed": seed, "teacher_s": teacher_s,
                    "wall_s": time.time() - t0},
    }  # fmt: skip
    ckpt = save_checkpoint(out / "checkpoints" / f"step_{train_steps:08d}", scfg, teacher.shape_meta, ema.model, info)  # fmt: skip
    point_symlink(out / "checkpoints" / "latest", ckpt)
    print(f"done in {(time.time() - t0) / 60:.1f} min: {ckpt}")
    return ckpt
