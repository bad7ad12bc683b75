"""`dp sim`: replay recorded Push-T demonstrations in our simulator, render them to video, or play by hand.

    dp sim replay STORE [--episodes 0 5 10-20]   replay recorded actions, report block drift per episode
    dp sim render STORE --episode I --out x.mp4  render an episode's recorded states (with the action cross)
    dp sim play [--seed S]                       push the T with the mouse (R: reset, Q: quit)

Argument parsing only; the commands are in diffusion_policy/data/replay_demo.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the replay, render and play subcommands."""
    sub = parser.add_subparsers(dest="sim_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("replay", help="replay recorded actions and report per-episode block drift")
    p.add_argument("store", type=Path, help="Push-T zarr store (e.g. pusht_cchi_v7_replay.zarr)")
    p.add_argument(
        "--episodes",
        nargs="+",
        default=None,
        metavar="I",
        help="episode indices or ranges such as 3 7 10-20 (default: all)",
    )
    p.add_argument("--tolerance", type=float, default=1.0, help="drift (px) counted as reproduced")

    p = sub.add_parser("render", help="render an episode's recorded states to a video")
    p.add_argument("store", type=Path, help="Push-T zarr store")
    p.add_argument("--episode", type=int, required=True, help="episode index")
    p.add_argument("--out", type=Path, required=True, help="output video (.mp4 or .gif)")
    p.add_argument(
        "--size", type=int, default=96, help="frame side in px (default 96, as the dataset)"
    )
    p.add_argument(
        "--fps", type=int, default=10, help="frames per second (default 10, the control rate)"
    )

    p = sub.add_parser(
        "play", help="play Push-T with the mouse in a pygame window (R resets, Q quits)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the first episode (then +1 per episode)"
    )


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen subcommand (diffusion_policy/data/replay_demo.py)."""
    from diffusion_policy.data import replay_demo

    if args.sim_command == "replay":
        return replay_demo.replay(args.store, args.episodes, args.tolerance)
    if args.sim_command == "render":
        return replay_demo.render(args.store, args.episode, args.out, args.size, args.fps)
    return replay_demo.play(args.seed)
