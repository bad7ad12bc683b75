"""The names a diffusion sampler is chosen by, in one torch-free place for configs and the CLI."""

from __future__ import annotations

from enum import StrEnum


class TimestepSpacing(StrEnum):
    """Which K of the T training timesteps a K-step sampler visits (diffusers' timestep_spacing)."""

    LEADING = "leading"  # the original code's: DDIM-10 starts at t=90
    TRAILING = "trailing"  # starts at t=T-1: better below 10 steps
    LINSPACE = "linspace"


SPACINGS: tuple[str, ...] = tuple(s.value for s in TimestepSpacing)
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
# how DDIM chunks are computed (policies/diffusion_sampling.py); DDPM always runs eager
BACKENDS: tuple[str, ...] = ("auto", "eager", "fused", "cpu", "cuda_graph")
