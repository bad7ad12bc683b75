"""`dp eval CHECKPOINT`: rollouts in-process, through a policy server, or paced on the wall clock."""

from __future__ import annotations

import argparse
import os

from diffusion_policy.cli.sampler_options import add_sampler_arguments
from diffusion_policy.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="checkpoint directory, or a run directory (uses its latest checkpoint)"
    )
    parser.add_argument(
        "--episodes", type=int, default=None, help="number of episodes (default 50)"
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
    add_sampler_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--out",
        default=None,
        help="output dir (default: <checkpoint>/eval-<seed_start>-<episodes>)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling noise seed")
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
    from dataclasses import replace
    from pathlib import Path

    from diffusion_policy.checkpoint import load_policy, read_checkpoint_meta, resolve_checkpoint
    from diffusion_policy.cli.sampler_options import apply_sampler_arguments
    from diffusion_policy.evaluation.rollout import Actor, check_server, evaluate

    if args.server:
        _, cfg, _ = read_checkpoint_meta(args.checkpoint)  # the task and eval settings
        policy = None
    else:
        policy, cfg, _ = load_policy(args.checkpoint, device=args.device)
    ecfg = replace(
        cfg.eval,
        **{
            k: v
            for k, v in dict(
                n_episodes=args.episodes,
                seed_start=args.seed_start,
                max_steps=args.max_steps,
                n_envs=args.n_envs,
                n_videos=args.videos,
                vector="sync" if args.sync else None,
            ).items()
            if v is not None
        },
    )
    if policy is not None:
        apply_sampler_arguments(policy, args)
    if args.server and (args.sampler or args.inference_steps or args.timestep_spacing):
        raise UserError(
            "--sampler/--inference-steps/--timestep-spacing apply in-process; pass them to `dp serve`"
        )
    mode = ("realtime-" if args.realtime else "") + ("server" if args.server else "")
    out = (
        Path(args.out)
        if args.out
        else resolve_checkpoint(args.checkpoint)
        / f"eval-{ecfg.seed_start}-{ecfg.n_episodes}{'-' + mode if mode else ''}"
    )
    clients = []
    try:
        if args.realtime:
            from diffusion_policy.evaluation.realtime import evaluate_checkpoint_realtime

            metrics = evaluate_checkpoint_realtime(
                policy, cfg, ecfg, out, clients, server=args.server, token=args.token,
                checkpoint=args.checkpoint, seed=args.seed, robots=args.robots,
                ensemble=args.ensemble, replan_every=args.replan_every,
            )  # fmt: skip
        elif args.server:
            from diffusion_policy.serving.client import ClientError, PolicyClient, RemoteActor

            try:
                clients.append(PolicyClient(args.server, token=args.token))
                check_server(clients[0].metadata, cfg, args.checkpoint)
                actor = RemoteActor(clients[0], seed=args.seed)
                metrics = evaluate(actor, cfg.task, ecfg, out_dir=out)
            except ClientError as e:  # server down, refused token, bad request: one line
                raise UserError(f"policy server {args.server}: {e}") from None
        else:
            metrics = evaluate(Actor(policy, seed=args.seed), cfg.task, ecfg, out_dir=out)
    finally:
        for c in clients:
            c.close()
    print(
        f"mean_score {metrics['mean_score']:.3f} [{metrics['mean_score_ci95'][0]:.3f}, {metrics['mean_score_ci95'][1]:.3f}]  "
        f"success_rate {metrics['success_rate']:.3f}  mean_final_coverage {metrics['mean_final_coverage']:.3f}  "
        f"({metrics['n_episodes']} episodes from seed {ecfg.seed_start}, {metrics['wall_time_s']:.0f} s)"
    )
    if "realtime" in metrics:
        rt = metrics["realtime"]
        print(
            f"realtime {rt['control_hz']:g} Hz, {rt['n_robots']} robots: plan latency p50 {rt['plan_latency_ms_p50']:.1f} ms "
            f"p99 {rt['plan_latency_ms_p99']:.1f} ms, {rt['plans']} plans, {rt['dropped_actions']} stale actions dropped, "
            f"{rt['hold_ticks']}/{rt['steps']} ticks held, {rt['late_ticks']} late ticks"
        )
    print(f"wrote {out / 'metrics.json'}")
    return 0
