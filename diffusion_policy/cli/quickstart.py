"""`dp quickstart`: the main job in one command — get demonstrations, train a Push-T policy, evaluate it.

Data, in order: `--data PATH`; the published human demos already in datasets/; a download of them
(`dp data fetch pusht`); and, where there is no network, demonstrations from the scripted expert
(`dp data generate pusht`). Then the CPU preset (or the paper preset on a GPU) trains, and the
training loop's final evaluation scores it on the paper's 50 test seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_policy.cli.options import add_threads_argument
from diffusion_policy.errors import DataError

HUMAN = Path("datasets/pusht/pusht_cchi_v7_replay.zarr")
EXPERT = Path("datasets/pusht_expert/pusht_expert.zarr")


def find_or_get_data(data: str | None, expert_episodes: int) -> Path:
    if data:
        if not Path(data).exists():
            raise DataError(f"--data {data}: no such store")
        return Path(data)
    if HUMAN.exists():
        return HUMAN
    try:
        from diffusion_policy.data.fetch import fetch

        return fetch("pusht", dest="datasets")
    except DataError as e:
        print(f"quickstart: could not get the human demonstrations ({e})")
    if EXPERT.exists():
        return EXPERT
    print(
        f"quickstart: generating {expert_episodes} scripted-expert demonstrations into {EXPERT} instead"
    )
    import os

    from diffusion_policy.data.expert import generate

    generate(EXPERT, expert_episodes, 0, min(os.cpu_count() or 1, 8), False)
    return EXPERT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="an existing Push-T zarr store to train on")
    parser.add_argument(
        "--preset",
        default=None,
        help="default: pusht_diffusion_state on a GPU, pusht_diffusion_state_cpu otherwise",
    )
    parser.add_argument(
        "--expert-episodes", type=int, default=200, help="expert demos to generate when offline"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a run already in the given run_dir"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-time budget of the training and its final evaluation (train.budget_min; the CPU "
        "preset's is 55): the lr schedule follows the time used, so the run finishes its schedule "
        "in the budget on any machine, and the steps it reaches (and so its score) depend on the "
        "machine's speed. Not bit-for-bit reproducible across machines",
    )
    add_threads_argument(parser)
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")


def run(args: argparse.Namespace) -> int:
    from diffusion_policy.threads import configure_threads

    configure_threads(args.threads)  # before torch loads
    import torch

    from diffusion_policy.config import load_config
    from diffusion_policy.training.loop import train

    data = find_or_get_data(args.data, args.expert_episodes)
    preset = args.preset or (
        "pusht_diffusion_state" if torch.cuda.is_available() else "pusht_diffusion_state_cpu"
    )
    budget = [f"train.budget_min={args.minutes}"] if args.minutes is not None else []
    threads = [f"train.num_threads={args.threads}"] if args.threads else []
    cfg = load_config(preset, [f"task.dataset={data}", *budget, *threads, *args.overrides])
    print(f"quickstart: training {preset} on {data}")
    run_dir = train(cfg, overwrite=args.overwrite)
    print(
        f"quickstart: run directory {run_dir}; scores in {run_dir}/eval/*/metrics.json and metrics.jsonl"
    )
    return 0
