"""Diffusion Policy: visuomotor policy learning by action diffusion (Chi et al., RSS 2023)."""

__version__ = "0.1.0"
