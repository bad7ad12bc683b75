"""`dp train PRESET [key=value ...]` and `dp train --resume RUN`."""

from __future__ import annotations

import argparse

from diffusion_policy.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "preset",
        nargs="?",
        default=None,
        help="preset name in configs/ or a .yaml path (default: pusht_diffusion_state)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, e.g. train.batch_size=64"
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run bit-for-bit from its latest checkpoint"
    )


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from diffusion_policy.checkpoint import read_checkpoint_meta
    from diffusion_policy.config import apply_resume_overrides, load_config
    from diffusion_policy.training.loop import train

    preset, overrides = args.preset, list(args.overrides)
    if preset and "=" in preset:  # `dp train key=value` with the default preset
        overrides.insert(0, preset)
        preset = None
    if args.resume:
        if preset:
            raise ConfigError("--resume continues a run with its saved config; give no preset")
        _, cfg, _ = read_checkpoint_meta(args.resume)
        cfg = apply_resume_overrides(cfg, overrides)
    else:
        cfg = load_config(preset, overrides)
    train(cfg, resume=args.resume)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
