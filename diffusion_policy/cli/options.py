"""Options several `dp` verbs share: the sampler (eval, serve, export) and the CPU threads."""

from __future__ import annotations

import argparse

from diffusion_policy.policies.sampler_names import BACKENDS, SAMPLERS, SPACINGS
from diffusion_policy.threads import THREADS_HELP


def add_spacing_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--timestep-spacing, one of the TimestepSpacing names (default: the checkpoint's)."""
    parser.add_argument("--timestep-spacing", choices=list(SPACINGS), default=None, help=help_text)


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """--sampler, --inference-steps, --timestep-spacing and --backend."""
    parser.add_argument(
        "--sampler", choices=list(SAMPLERS), default=None, help="diffusion sampler override"
    )
    parser.add_argument(
        "--inference-steps", type=int, default=None, help="sampler steps override (e.g. DDIM 10)"
    )
    add_spacing_argument(
        parser, "which timesteps a K-step sampler visits (trailing starts at t=T-1)"
    )
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="auto",
        help="how DDIM chunks are computed: auto (cpu kernel or CUDA graph), fused, cpu, "
        "cuda_graph, or eager (the reference diffusers loop). DDPM always runs eager.",
    )


def apply_sampler_arguments(policy, args: argparse.Namespace) -> None:
    """Apply the options of add_sampler_arguments to a loaded policy (its contract's configure_sampler)."""
    policy.configure_sampler(
        args.sampler, args.inference_steps, args.timestep_spacing, args.backend
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """--threads N (0: the measured default, see diffusion_policy/threads.py)."""
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
