"""`dp serve CHECKPOINT`: the policy server for robot controllers."""

from __future__ import annotations

import argparse
import os

from diffusion_policy.cli.sampler_options import add_sampler_arguments
from diffusion_policy.errors import UserError
from diffusion_policy.serving.protocol import ServeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    parser.add_argument(
        "checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)"
    )
    parser.add_argument(
        "--host", default=d.host, help="interface to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument(
        "--port", type=int, default=d.port, help="TCP port (default 8000; 0 picks a free one)"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("DP_SERVE_TOKEN"),
        help="require 'Authorization: Api-Key TOKEN' (default: $DP_SERVE_TOKEN, else no token)",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    add_sampler_arguments(parser)
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="rows per forward pass")
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_ms,
        help="longest wait to fill a batch (0: never wait)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=d.max_message_bytes,
        help="largest request accepted (closes with 1009 above)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch default; 1 avoids stalls when other processes share the cores)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the warmup forward pass")
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="noise seed for requests that carry none"
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.max_batch < 1:
        raise UserError(f"--max-batch={args.max_batch}: must be >= 1")
    if args.batch_wait_ms < 0:
        raise UserError(f"--batch-wait-ms={args.batch_wait_ms}: must be >= 0")
    if args.max_message_bytes < 1024:
        raise UserError(f"--max-message-bytes={args.max_message_bytes}: must be >= 1024")
    if args.token is not None and not args.token.strip():
        raise UserError("--token is empty")
    if args.threads < 0:
        raise UserError(f"--threads={args.threads}: must be >= 0")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port={args.port}: must be in 0..65535")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    import torch

    from diffusion_policy.checkpoint import load_policy
    from diffusion_policy.cli.sampler_options import apply_sampler_arguments
    from diffusion_policy.serving.server import PolicyServer, log

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _check_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    policy, cfg, meta = load_policy(args.checkpoint, device=args.device)
    apply_sampler_arguments(policy, args)
    config = ServeConfig(
        host=args.host,
        port=args.port,
        token=args.token,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_message_bytes=args.max_message_bytes,
        warmup=not args.no_warmup,
        seed=args.seed,
    )
    if not _is_loopback(args.host):
        log.warning(
            "binding %s: reachable from other machines%s",
            args.host,
            "" if args.token else " by anyone (no --token)",
        )
    server = PolicyServer(policy, cfg, config, meta)
    m = server.metadata
    obs = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in m["obs"].items())
    log.info(
        "policy %s: obs %s -> actions (%d, %d); %s-%s",
        m["policy_type"],
        obs,
        m["n_action_steps"],
        m["action_dim"],
        m["sampler"],
        m["num_inference_steps"],
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        task = asyncio.create_task(server.serve_forever())
        while server.port is None and not task.done():
            await asyncio.sleep(0.05)
        if server.port is not None:
            log.info(
                "serving on %s (health: http://%s:%d/healthz)", server.url, args.host, server.port
            )
        await task

    try:
        asyncio.run(main())
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    log.info(
        "stopped after %d requests (%d errors)", server.stats["requests"], server.stats["errors"]
    )
    return 0
