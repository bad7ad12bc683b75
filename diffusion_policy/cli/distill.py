"""`dp distill RUN --out DIR`: a 1- or 2-step sampler learnt from a trained diffusion policy."""

from __future__ import annotations

import argparse

from diffusion_policy.cli.options import add_threads_argument
from diffusion_policy.policies.sampler_names import SPACINGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the teacher: a diffusion checkpoint or run directory")
    parser.add_argument("--out", required=True, help="run directory for the student")
    parser.add_argument("--steps", type=int, default=1, help="student sampler steps (1 or 2)")
    parser.add_argument("--teacher-steps", type=int, default=8, help="teacher DDIM steps")
    parser.add_argument("--teacher-spacing", default="trailing", choices=list(SPACINGS))  # fmt: skip
    # the defaults are the measured run of docs/RESULTS.md (1 step: 0.926 against DDPM-100's 0.954)
    parser.add_argument("--train-steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument(
        "--pool", type=int, default=32768, help="(observation, noise) pairs the teacher labels"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    add_threads_argument(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a run already in --out (deletes it)"
    )


def run(args: argparse.Namespace) -> int:
    from diffusion_policy.threads import configure_threads

    configure_threads(args.threads)  # before torch loads
    from diffusion_policy.training.distill import distill

    distill(
        args.checkpoint, args.out, steps=args.steps, teacher_steps=args.teacher_steps,
        teacher_spacing=args.teacher_spacing, train_steps=args.train_steps,
        batch_size=args.batch_size, lr=args.lr, pool_size=args.pool, seed=args.seed,
        device=args.device, overwrite=args.overwrite,
    )  # fmt: skip
    return 0
