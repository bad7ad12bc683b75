"""`dp serve CHECKPOINT`: the policy server for robot controllers."""

from __future__ import annotations

import argparse
import os

from diffusion_policy.cli.options import add_sampler_arguments, add_threads_argument
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
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Api-Key TOKEN'. Visible to every user in `ps`: prefer "
        "$DP_SERVE_TOKEN or --token-file (default: $DP_SERVE_TOKEN, else no token)",
    )
    tok.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help="read the token from the first line of this file (keep it mode 0600)",
    )
    parser.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="serve wss:// with this certificate chain (with --tls-key); or put a TLS reverse "
        "proxy in front. Use TLS and a token on any network beyond this machine",
    )
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
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
    add_threads_argument(parser)
    parser.add_argument("--no-warmup", action="store_true", help="skip the warmup forward pass")
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="noise seed for requests that carry none"
    )


def _read_token(args: argparse.Namespace) -> str | None:
    """--token, else the first line of --token-file, else $DP_SERVE_TOKEN (None: no token)."""
    if args.token_file is not None:
        try:
            lines = open(args.token_file, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--token-file {args.token_file}: cannot read it: {e}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise UserError(f"--token-file {args.token_file}: the first line is empty")
        return token
    return args.token if args.token is not None else os.environ.get("DP_SERVE_TOKEN")


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
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    for name in ("tls_cert", "tls_key"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            raise UserError(f"--{name.replace('_', '-')} {path}: no such file")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import gc
    import logging
    import time

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # one line per connection (and none for a connect that never handshakes) drowns the log
    logging.getLogger("websockets").setLevel(logging.WARNING)
    args.token = _read_token(args)
    _check_args(args)
    from diffusion_policy.threads import configure_threads

    configure_threads(args.threads)  # before torch loads
    t0 = time.perf_counter()
    server = _build_server(args)
    log = logging.getLogger("dp.serve")
    m = server.metadata
    obs = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in m["obs"].items())
    c = m["checkpoint"]
    log.info(
        "policy %s: obs %s -> actions (%d, %d); %s-%s, %s backend; checkpoint step %s sha256 %s "
        "(loaded in %.1f s)",
        m["policy_type"], obs, m["n_action_steps"], m["action_dim"], m["sampler"],
        m["num_inference_steps"], c.get("backend"), c.get("step"), c.get("sha256", "?")[:12],
        time.perf_counter() - t0,
    )  # fmt: skip
    _serve(server, args, t0)
    log.info(
        "stopped after %d requests (%d errors)", server.stats["requests"], server.stats["errors"]
    )
    # freed now, built kernels are cheap to drop; left to interpreter exit they take seconds
    del server
    gc.collect()
    return 0


def _build_server(args: argparse.Namespace):
    from diffusion_policy.checkpoint import load_policy, resolve_checkpoint
    from diffusion_policy.cli.options import apply_sampler_arguments
    from diffusion_policy.serving.server import PolicyServer, log

    log.info("loading %s", args.checkpoint)
    policy, cfg, meta = load_policy(args.checkpoint, device=args.device)
    path = resolve_checkpoint(args.checkpoint)
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
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    if not _is_loopback(args.host):
        log.warning(
            "binding %s: reachable from other machines%s%s",
            args.host,
            "" if args.token else " by anyone (no token)",
            "" if args.tls_cert else ", unencrypted (no --tls-cert)",
        )
    return PolicyServer(policy, cfg, config, meta, checkpoint_dir=path)


def _serve(server, args: argparse.Namespace, t0: float) -> None:
    import asyncio
    import signal
    import time

    from diffusion_policy.serving.server import log

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        task = asyncio.create_task(server.serve_forever())
        while server.port is None and not task.done():
            await asyncio.sleep(0.05)
        if server.port is not None:
            log.info(
                "serving on %s (health: http%s://%s:%d/healthz), %.1f s after start",
                server.url, "s" if args.tls_cert else "", args.host, server.port,
                time.perf_counter() - t0,
            )  # fmt: skip
        await task

    try:
        asyncio.run(main())
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
