"""`dp data ...`: inspect, validate, fetch, generate, record and convert demonstration stores.

Each subcommand is one `_cmd_<name>(args) -> int` function plus one `_SUBCOMMANDS` line giving its help
and an argument-adding function. Library modules are imported inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from diffusion_policy.errors import DataError


def _cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from diffusion_policy.data.replay_buffer import ReplayBuffer
    from diffusion_policy.data.task_spec import guess_task_yaml

    buf = ReplayBuffer.open(args.path, "r")
    lengths = buf.episode_lengths
    print(f"store     {buf.path}")
    print(f"format    zarr v{buf._group.metadata.zarr_format}")
    print(f"episodes  {buf.n_episodes}")
    print(f"steps     {buf.n_steps}")
    if lengths.size:
        print(
            f"lengths   min {lengths.min()}  median {np.median(lengths):.0f}  mean {lengths.mean():.1f}  "
            f"max {lengths.max()}  (steps per episode)"
        )
    print(f"{'key':<20} {'shape':<22} {'frame':<16} {'dtype':<9} {'chunks':<20} compressors")
    arrays = [(f"data/{k}", buf[k]) for k in buf.keys()] + [("meta/episode_ends", buf._ends)]
    for name, a in arrays:
        comp = getattr(a, "compressors", ()) or ()
        comp_s = ", ".join(
            type(c).__name__ if not hasattr(c, "cname") else f"{type(c).__name__}({_cname(c)})"
            for c in comp
        )
        frame = str(tuple(a.shape[1:])) if name.startswith("data/") else "-"
        print(
            f"{name:<20} {str(tuple(a.shape)):<22} {frame:<16} {str(np.dtype(a.dtype)):<9} {str(tuple(a.chunks)):<20} {comp_s}"
        )
    print()
    print("# a task spec guessed from the keys (check the kinds, then paste it into a preset):")
    print(guess_task_yaml(buf, str(args.path)), end="")
    return 0


def _cname(c: object) -> str:
    name = getattr(c, "cname", "")
    return str(getattr(name, "value", name))


def _cmd_validate(args: argparse.Namespace) -> int:
    from diffusion_policy.data.fetch import load_manifest
    from diffusion_policy.data.validation import check_store

    manifest = load_manifest(args.manifest) if args.manifest else None
    report = check_store(args.path, args.obs_type, args.task, manifest)
    for line in report.notes + report.problems:
        print(line)
    if report.problems:
        print(f"{len(report.problems)} problem(s)")
        return 1
    print("OK")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from diffusion_policy.data.fetch import fetch

    fetch(args.manifest or args.name, dest=args.dest, url=args.url, force=args.force)
    return 0


def _args_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a replay-buffer zarr store (directory)")


def _args_validate(p: argparse.ArgumentParser) -> None:
    _args_path(p)
    p.add_argument(
        "--obs-type",
        default=None,
        help="fail unless the store can train this Push-T obs type (state, keypoints, pixels_agent_pos)",
    )
    p.add_argument(
        "--task",
        default="pusht",
        metavar="{pusht,none,PRESET}",
        help="whose needs to check (default pusht; none: only the store itself; a preset name or "
        "yaml, e.g. blockpush_diffusion_state: the sources, dtypes and shapes its task declares)",
    )
    p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)  # tests: another manifest


def _args_fetch(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=["pusht"], help="which published dataset")
    p.add_argument("--dest", default="datasets", help="destination folder (default: datasets/)")
    p.add_argument(
        "--url", default=None, help="http(s) URL, file:// URL, local .zip or local .zarr directory"
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing copy that fails verification"
    )
    p.add_argument(
        "--manifest", default=None, help=argparse.SUPPRESS
    )  # tests: verify against another manifest


def _args_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "task",
        choices=["pusht", "blockpush"],
        help="which task (blockpush: the multimodal Block Pushing oracle, its mode frequencies printed)",
    )
    p.add_argument("--episodes", type=int, required=True, help="number of episodes (seeds) to run")
    p.add_argument("--out", type=Path, required=True, help="new zarr store to write")
    p.add_argument(
        "--seed-start",
        "--seed",
        type=int,
        default=0,
        help="env seed of the first episode (default 0)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="parallel processes (default: the CPU count, at most 8)",
    )
    p.add_argument(
        "--keep-failures",
        action="store_true",
        help="also store episodes that did not succeed within the task's episode cap (300/350 steps)",
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from diffusion_policy.data.expert import generate

    generate(
        args.out, args.episodes, args.seed_start, args.workers, args.keep_failures, task=args.task
    )
    return 0


def _args_record(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=["pusht"], help="which task")
    p.add_argument(
        "--out", type=Path, required=True, help="zarr store to append to (created if missing)"
    )
    p.add_argument(
        "--seed-start",
        type=int,
        default=None,
        help="env seed of the first episode (default: the store's episode count, as the original)",
    )


def _cmd_record(args: argparse.Namespace) -> int:
    from diffusion_policy.data.record import record

    record(args.out, args.seed_start)
    return 0


def _args_convert_robomimic(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "file", type=Path, help="a robomimic .hdf5 file (data/demo_N/{actions,obs/<key>})"
    )
    p.add_argument("--out", type=Path, required=True, help="new zarr store to write")
    p.add_argument(
        "--filter-key",
        default=None,
        help="convert only the demos listed under mask/<KEY> (e.g. train, valid)",
    )
    p.add_argument(
        "--keys",
        default=None,
        help="comma-separated obs keys to keep (default: all keys of the first demo)",
    )


def _cmd_convert_robomimic(args: argparse.Namespace) -> int:
    from diffusion_policy.data.convert.robomimic import convert_robomimic

    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    s = convert_robomimic(args.file, args.out, args.filter_key, keys)
    shapes = ", ".join(f"{k} {shape} {dtype}" for k, (shape, dtype) in s.keys.items())
    print(f"wrote {s.out}: {s.n_episodes} episodes, {s.n_steps} steps; {shapes}")
    print(f"next: `dp data info {s.out}` prints a task spec to paste into your config")
    return 0


def _args_convert_lerobot(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a LeRobotDataset directory (v3.0 or v2.1)")
    p.add_argument("--out", type=Path, required=True, help="new replay-buffer zarr store to write")
    p.add_argument(
        "--tolerance-s",
        type=float,
        default=1e-4,
        help="how far a video frame's time may be from its table row's (default 1e-4 s, LeRobot's)",
    )


def _cmd_convert_lerobot(args: argparse.Namespace) -> int:
    from diffusion_policy.data.convert.lerobot import convert_lerobot

    r = convert_lerobot(args.path, args.out, tolerance_s=args.tolerance_s)
    keys = ", ".join(f"{k} <- {f}" for f, k in r.keys.items())
    print(f"wrote {r.out}: {r.episodes} episodes, {r.frames} frames; keys {keys}")
    print(f"next: `dp data info {r.out}` prints a task spec to paste into your config")
    return 0


def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=["lerobot"], help="the target format")
    p.add_argument("path", type=Path, help="a replay-buffer zarr store")
    p.add_argument("--out", type=Path, required=True, help="new LeRobotDataset v3.0 directory")
    p.add_argument(
        "--fps", type=int, default=None, help="frame rate (default: the store's, if it records one)"
    )
    p.add_argument(
        "--vcodec",
        choices=["libsvtav1", "h264"],
        default="libsvtav1",
        help="video encoder for uint8 (H, W, 3) keys (default libsvtav1: AV1, LeRobot's default)",
    )
    p.add_argument(
        "--task", default=None, help="task text for every episode (default: the store's)"
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from diffusion_policy.data.convert.lerobot import export_lerobot

    r = export_lerobot(args.path, args.out, fps=args.fps, vcodec=args.vcodec, task=args.task)
    feats = ", ".join(f"{k} -> {f}" for k, f in r.features.items())
    print(f"wrote {r.out} (LeRobotDataset v3.0): {r.episodes} episodes, {r.frames} frames; {feats}")
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
# `dp data convert SOURCE ...`: one entry per source format, the same (help, add-arguments, run).
_CONVERT_SOURCES: dict[str, Command] = {
    "lerobot": (
        "a LeRobotDataset directory (v3.0 or v2.1): parquet tables and mp4 videos",
        _args_convert_lerobot,
        _cmd_convert_lerobot,
    ),
    "robomimic": (
        "a robomimic HDF5 file (data/demo_N/obs/<key>, actions; mask/ filter keys)",
        _args_convert_robomimic,
        _cmd_convert_robomimic,
    ),
}


def _args_convert(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="convert_source", metavar="SOURCE", required=True)
    for name, (help_text, add, _) in _CONVERT_SOURCES.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def _cmd_convert(args: argparse.Namespace) -> int:
    return _CONVERT_SOURCES[args.convert_source][2](args)


# name -> (help, add-arguments, run). Adding a subcommand is one function and one line here.
_SUBCOMMANDS: dict[str, Command] = {
    "info": (
        "episodes, steps, keys, shapes, dtypes, chunks, episode lengths and a task spec to paste",
        _args_path,
        _cmd_info,
    ),
    "validate": (
        "check structure, chunk files, every value, the published manifest and what the store can train",
        _args_validate,
        _cmd_validate,
    ),
    "fetch": ("download and verify a published dataset into datasets/", _args_fetch, _cmd_fetch),
    "generate": ("demos from the scripted expert (offline data)", _args_generate, _cmd_generate),
    "record": ("teleoperate with the mouse and append episodes", _args_record, _cmd_record),
    "convert": (
        "convert another dataset format (LeRobot, robomimic) into a replay-buffer store",
        _args_convert,
        _cmd_convert,
    ),
    "export": ("write a store as a LeRobotDataset v3.0 to publish", _args_export, _cmd_export),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    for name, (help_text, add, _) in _SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    if args.data_command not in _SUBCOMMANDS:
        raise DataError(f"unknown data subcommand {args.data_command!r}")
    return _SUBCOMMANDS[args.data_command][2](args)


__all__ = ["add_arguments", "run"]
