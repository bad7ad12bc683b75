"""`dp train PRESET [key=value ...]` and `dp train --resume RUN`."""

from __future__ import annotations

import argparse

from diffusion_policy.errors import ConfigError

BUDGET_HELP = (
    "train.budget_min=M trains for M minutes of wall time (pusht_diffusion_state_cpu: 55): the lr "
    "schedule and the stop follow the fraction of the budget used, less train.budget_eval_min kept "
    "for the final evaluation, so the schedule always ends in the budget; the steps reached depend on "
    "the machine, so such a run is not bit-for-bit reproducible across machines (a step-based run, "
    "train.budget_min=null train.max_steps=N, is). --resume of a budgeted run continues from the time "
    "used at its latest checkpoint. Threads: train.num_threads (0 = every core while the machine is "
    "free, one fewer per core other processes keep busy; N > 0 or a set OMP_NUM_THREADS fixes the count, "
    "which bit-for-bit resume needs)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = BUDGET_HELP
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run_dir that already holds a run (deletes that run first)",
    )


def run(args: argparse.Namespace) -> int:
    from diffusion_policy.threads import configure_threads

    configure_threads()  # before torch loads; train.num_threads, when set, wins in train()
    import torch.distributed as dist

    from diffusion_policy.checkpoint import read_checkpoint_meta
    from diffusion_policy.config import apply_resume_overrides, load_config
    from diffusion_policy.training.loop import train
    from diffusion_policy.training.run_dir import resume_run_dir

    preset, overrides = args.preset, list(args.overrides)
    if preset and "=" in preset:  # `dp train key=value` with the default preset
        overrides.insert(0, preset)
        preset = None
    resume = None
    if args.resume:
        if preset:
            raise ConfigError("--resume continues a run with its saved config; give no preset")
        if args.overwrite:
            raise ConfigError("--resume continues a run and --overwrite deletes it: give one")
        resume = resume_run_dir(args.resume)
        _, cfg, meta = read_checkpoint_meta(resume)
        if "distilled_from" in meta:
            raise ConfigError(f"{resume} is a `dp distill` run: run dp distill again to redo it")
        cfg = apply_resume_overrides(cfg, overrides)
    else:
        cfg = load_config(preset, overrides)
    train(cfg, resume=resume, overwrite=args.overwrite)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
