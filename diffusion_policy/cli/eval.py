"""`dp eval CHECKPOINT`: rollouts in-process, through a policy server, or paced on the wall clock;
offline against held-out demonstrations where the task has no simulator."""

from __future__ import annotations

import argparse
import os

from diffusion_policy.cli.options import add_sampler_arguments, add_threads_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="checkpoint directory, or a run directory (uses its latest checkpoint)"
    )
    parser.add_argument(
        "--episodes",
        type=int,
        default=None,
        help="number of episodes (default 50; offline: the first N held-out episodes, default all)",
    )
    parser.add_argument(
        "--seed-start",
        type=int,
        default=None,
        help="first env seed (default 100000, the paper's test seeds)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="env steps per episode (default 300)"
    )
    parser.add_argument(
        "--n-envs",
        type=int,
        default=None,
        help="envs per wave, i.e. the policy batch (default: all episodes at once)",
    )
    parser.add_argument(
        "--videos", type=int, default=None, help="record mp4s of the first N episodes (default 4)"
    )
    parser.add_argument(
        "--sync",
        action="store_true",
        help="step envs in-process (SyncVectorEnv) instead of worker processes",
    )
    add_threads_argument(parser)
    add_sampler_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--out",
        default=None,
        help="output dir (default: RUN/eval/<checkpoint>-<seed_start>-<episodes>[-mode] for a "
        "checkpoint of a run, where pruning never reaches; else beside the checkpoint)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling noise seed (default: the checkpoint's train.seed, as the training loop's "
        "own evaluation, so a checkpoint scores the same both ways)",
    )
    _add_execution_arguments(parser)
    _add_offline_arguments(parser)
    _add_server_arguments(parser)


def _add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    e = parser.add_argument_group(
        "latency: how chunks are joined under a simulated inference delay (diffusion_policy/execution.py)"
    )
    e.add_argument(
        "--delay",
        type=int,
        default=None,
        metavar="D",
        help="simulated inference delay in control steps: the env advances D steps with the old "
        "plan while the new one computes (deterministic, no wall clock; default 0)",
    )
    e.add_argument(
        "--strategy",
        choices=("sync", "async", "ensemble", "rtc", "bid"),
        default=None,
        help="sync: wait for each plan (hold for D steps), the default; async: switch to the new "
        "plan when it arrives; ensemble: average overlapping plans; rtc: real-time chunking "
        "(guided inpainting of the executing prefix); bid: best of N by coherence with the prefix",
    )
    e.add_argument(
        "--n-action-steps",
        "--execute-steps",
        dest="n_action_steps",
        type=int,
        default=None,
        metavar="TA",
        help="actions executed per plan (default: the checkpoint's n_action_steps); "
        "delay + TA must be at most horizon - n_obs_steps + 1",
    )
    e.add_argument(
        "--bid-samples",
        type=int,
        default=None,
        metavar="N",
        help="bid: candidate chunks per plan (default 16)",
    )
    e.add_argument(
        "--rtc-beta",
        type=float,
        default=None,
        metavar="B",
        help="rtc: clip on the guidance weight (default 5, the RTC paper's)",
    )
    e.add_argument(
        "--ensemble-decay",
        type=float,
        default=None,
        metavar="M",
        help="ensemble: weights exp(-M*i), i = 0 the oldest plan (default 0.01, as ACT)",
    )


def _add_offline_arguments(parser: argparse.ArgumentParser) -> None:
    o = parser.add_argument_group(
        "offline evaluation (the default for a task without a simulator, task.env_id null)"
    )
    o.add_argument(
        "--offline",
        action="store_true",
        help="score sampled action chunks against held-out demonstrations instead of rolling out; "
        "writes metrics.json and trajectories.png (predicted vs demonstrated actions)",
    )
    o.add_argument(
        "--dataset",
        default=None,
        metavar="STORE",
        help="offline: evaluate on every episode of this zarr store instead of the run's held-out ones",
    )


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "policy server and real-time pacing (see diffusion_policy/serving)"
    )
    g.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="run the policy on a `dp serve` server (ws://HOST:PORT) instead of in-process",
    )
    g.add_argument(
        "--token",
        default=os.environ.get("DP_SERVE_TOKEN"),
        help="server token (default: $DP_SERVE_TOKEN)",
    )
    g.add_argument(
        "--realtime",
        action="store_true",
        help="pace each env at the task's control rate on the wall clock; inference runs while "
        "queued actions execute and stale actions are dropped",
    )
    g.add_argument(
        "--robots", type=int, default=None, help="realtime: envs run at once (default: --n-envs)"
    )
    g.add_argument(
        "--ensemble",
        type=float,
        default=None,
        metavar="M",
        help="realtime: temporal ensembling of overlapping chunks, weights exp(-M*i) (i=0 oldest)",
    )
    g.add_argument(
        "--replan-every",
        type=int,
        default=None,
        metavar="K",
        help="realtime: also replan every K ticks (default: only when the queue is about to run dry)",
    )


def run(args: argparse.Namespace) -> int:
    from diffusion_policy.threads import configure_threads

    configure_threads(args.threads)  # before torch loads
    from diffusion_policy.evaluation.checkpoint_eval import (
        EvalOptions,
        evaluate_checkpoint,
        summary_lines,
    )

    opts = EvalOptions(
        episodes=args.episodes, seed_start=args.seed_start, max_steps=args.max_steps,
        n_envs=args.n_envs, videos=args.videos, sync=args.sync, device=args.device, out=args.out,
        seed=args.seed, sampler=args.sampler, inference_steps=args.inference_steps,
        timestep_spacing=args.timestep_spacing, backend=args.backend, server=args.server,
        token=args.token, realtime=args.realtime, robots=args.robots, ensemble=args.ensemble,
        replan_every=args.replan_every, offline=args.offline, dataset=args.dataset,
        delay=args.delay, strategy=args.strategy, n_action_steps=args.n_action_steps,
        bid_samples=args.bid_samples, ensemble_decay=args.ensemble_decay, rtc_beta=args.rtc_beta,
    )  # fmt: skip
    metrics, out = evaluate_checkpoint(args.checkpoint, opts)
    print("\n".join(summary_lines(metrics, out)))
    return 0
