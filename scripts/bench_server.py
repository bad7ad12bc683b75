"""Benchmark `dp serve` from the client side: latency, overhead over in-process inference,
throughput with 1, 8 and 32 concurrent clients, and a sustained fleet of robots at 10 Hz.

    .venv/bin/python scripts/bench_server.py runs/bench_server_cpu/checkpoints/latest

The server runs as its own `dp serve` process on a free loopback port, as it would be deployed;
clients are threads of this process, each with its own connection (diffusion_policy.serving.client).
Every request carries a request id and a seed; the script checks that every client got exactly one
reply per request, in order, and prints a markdown table (and --json for the raw numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusion_policy.serving.client import PolicyClient  # noqa: E402


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def bench_policy(ckpt: str, sampler: str, steps: int, backend: str):
    """The policy as `dp serve` runs it: same sampler, steps and inference backend."""
    from diffusion_policy.checkpoint import load_policy

    policy, _, _ = load_policy(ckpt)
    policy.set_sampler(sampler, steps)
    policy.set_inference_backend(backend)
    return policy


def in_process_latency(
    ckpt: str, sampler: str, steps: int, threads: int, n: int, backend: str = "auto"
) -> list[float]:
    """B=1 `predict_action_chunk` wall time in ms, with the server's sampler, backend and threads,
    and its noise path (explicit noise when the chunk is deterministic given it)."""
    import torch

    torch.set_num_threads(threads)
    policy = bench_policy(ckpt, sampler, steps, backend)
    policy.prepare_inference(1)  # what the server's warm-up does
    obs = make_obs(policy.shape_meta, policy.config.n_obs_steps, np.random.default_rng(0))
    batch = {k: v[None] for k, v in obs.items()}
    noise = policy.deterministic_given_noise() and policy.noise_shape(1) is not None
    out = []
    for i in range(n + 5):
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            if noise:
                policy.predict_action_chunk(
                    batch, noise=torch.randn(policy.noise_shape(1), generator=gen)
                )
            else:
                policy.predict_action_chunk(batch, generator=gen)
        if i >= 5:  # warm-up calls excluded
            out.append((time.perf_counter() - t) * 1e3)
    return out


ECHO_SERVER = """
import asyncio
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0, compression=None, max_size=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
"""


def echo_floor(n: int) -> list[float]:
    """Round trip of a request-sized frame through a bare websockets echo server (own process):
    the least any websocket server can add on this machine right now."""
    from websockets.sync.client import connect

    from diffusion_policy.serving.protocol import packb

    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        frame = packb(
            {
                **make_obs(
                    {"keypoints": {"shape": [2, 20], "dtype": "float32"}},
                    2,
                    np.random.default_rng(0),
                ),
                "seed": 1,
            }
        )
        with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            out = []
            for i in range(n + 5):
                t = time.perf_counter()
                ws.send(frame)
                ws.recv()
                if i >= 5:
                    out.append((time.perf_counter() - t) * 1e3)
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def make_obs(spec, n_obs_steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A plausible observation from metadata ({key: {"shape", "dtype"}}) or a ShapeMeta."""
    items = (
        {k: (v["shape"][1:], v["dtype"]) for k, v in spec.items()}
        if isinstance(spec, dict)
        else {k: (s.shape, s.dtype) for k, s in spec.obs.items()}
    )
    out = {}
    for k, (shape, dtype) in items.items():
        if dtype == "uint8":
            out[k] = rng.integers(0, 256, (n_obs_steps, *shape), dtype=np.uint8)
        else:
            out[k] = rng.uniform(50, 450, (n_obs_steps, *shape)).astype(np.float32)
    return out


def server_command(args: argparse.Namespace) -> list[str]:
    """`dp serve` with the same sampler, steps, backend and threads as the in-process baseline."""
    return [
        sys.executable, "-m", "diffusion_policy.cli", "serve", args.checkpoint, "--port", "0",
        "--threads", str(args.threads), "--sampler", args.sampler,
        "--inference-steps", str(args.inference_steps), "--backend", args.backend,
        "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
    ]  # fmt: skip


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """Start `dp serve` and wait until it listens and (per its log) every batch size is built."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(server_command(args), stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    lines: list[str] = []
    url = None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "serving on " in line:
            url = line.split("serving on ")[1].split()[0]
            if "building batch sizes" not in "".join(lines):
                break
        if url and "batch sizes ready" in line:
            break
    if url is None:
        proc.kill()
        raise SystemExit("dp serve did not start:\n" + "".join(lines))
    # Keep draining the server's log so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, url


def run_clients(url: str, n_clients: int, body, *args) -> list[dict]:
    """Run `body(client, index, barrier, *args) -> dict` in one thread per client."""
    barrier = threading.Barrier(n_clients)
    results: list[dict | None] = [None] * n_clients
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with PolicyClient(url, timeout=30) as client:
                results[i] = body(client, i, barrier, *args)
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def closed_loop(client: PolicyClient, i: int, barrier: threading.Barrier, n: int) -> dict:
    """Back-to-back requests: the next is sent as soon as the reply arrives."""
    rng = np.random.default_rng(i)
    meta = client.metadata
    obs = [make_obs(meta["obs"], meta["n_obs_steps"], rng) for _ in range(8)]
    for w in range(3):
        client.infer(obs[w], seed=w)
    barrier.wait()
    rtt, infer, server, batch, ids = [], [], [], [], []
    t_start = time.perf_counter()
    for r in range(n):
        t = time.perf_counter()
        out = client.infer(obs[r % 8], seed=r, request_id=f"{i}-{r}")
        rtt.append((time.perf_counter() - t) * 1e3)
        infer.append(out["infer_ms"])
        server.append(out["server_ms"])
        batch.append(out["batch_size"])
        ids.append(out["request_id"])
    return {
        "rtt": rtt, "infer": infer, "server": server, "batch": batch, "start": t_start,
        "end": time.perf_counter(), "in_order": ids == [f"{i}-{r}" for r in range(n)],
    }  # fmt: skip


def open_loop(
    client: PolicyClient,
    i: int,
    barrier: threading.Barrier,
    hz: float,
    seconds: float,
    n_robots: int,
) -> dict:
    """A robot at `hz`: request k is sent at t0 + phase + k / hz (or as soon as the previous returns)."""
    rng = np.random.default_rng(100 + i)
    meta = client.metadata
    obs = [make_obs(meta["obs"], meta["n_obs_steps"], rng) for _ in range(8)]
    client.infer(obs[0], seed=0)
    barrier.wait()
    dt = 1.0 / hz
    t0 = time.perf_counter() + 0.05 + i * dt / n_robots  # robots are not in phase
    n_slots = int(seconds * hz)
    rtt, ids, slot, sent = [], [], 0, 0
    while slot < n_slots:
        wait = t0 + slot * dt - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t = time.perf_counter()
        out = client.infer(obs[sent % 8], seed=sent, request_id=sent)
        rtt.append((time.perf_counter() - t) * 1e3)
        ids.append(out["request_id"])
        sent += 1
        # A robot does not queue up the slots it missed while waiting: it sends at the next one.
        slot = max(slot + 1, math.ceil((time.perf_counter() - t0) / dt))
    return {
        "rtt": rtt,
        "missed": n_slots - sent,
        "in_order": ids == list(range(sent)),
        "sent": sent,
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--inference-steps", type=int, default=10)
    p.add_argument(
        "--backend", default="auto", help="inference backend, server and in-process alike"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads, server and in-process")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--requests",
        type=int,
        default=400,
        help="closed loop: requests per level, split over clients",
    )
    p.add_argument("--sustained-clients", type=int, default=8)
    p.add_argument("--sustained-hz", type=float, default=10.0)
    p.add_argument("--sustained-s", type=float, default=60.0, help="0 skips the sustained run")
    p.add_argument("--json", default=None, help="write the raw numbers here")
    args = p.parse_args()
    # On SIGTERM run the `finally` below, so the server process never outlives the benchmark.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    base = in_process_latency(
        args.checkpoint,
        args.sampler,
        args.inference_steps,
        args.threads,
        n=min(args.requests, 200),
        backend=args.backend,
    )
    base50, base99 = percentiles(base)
    echo50, echo99 = percentiles(echo_floor(200))
    proc, url = start_server(args)
    levels, sustained = [], None
    try:
        for n in args.clients:
            per = max(5, args.requests // n)
            res = run_clients(url, n, closed_loop, per)
            rtt = [x for r in res for x in r["rtt"]]
            over = [a - b for r in res for a, b in zip(r["rtt"], r["infer"])]
            in_server = [a - b for r in res for a, b in zip(r["server"], r["infer"])]
            wall = max(r["end"] for r in res) - min(r["start"] for r in res)
            levels.append(
                {
                    "clients": n,
                    "requests": len(rtt),
                    "answered_in_order": all(r["in_order"] for r in res),
                    "rtt_p50": percentiles(rtt)[0],
                    "rtt_p99": percentiles(rtt)[1],
                    "infer_p50": percentiles([x for r in res for x in r["infer"]])[0],
                    "overhead_p50": percentiles(over)[0],
                    "overhead_p99": percentiles(over)[1],
                    "server_side_p50": percentiles(in_server)[0],
                    "mean_batch": float(np.mean([x for r in res for x in r["batch"]])),
                    "throughput": len(rtt) / wall,
                }
            )
            print(f"closed loop, {n} clients: done", file=sys.stderr)
        if args.sustained_s > 0:
            n = args.sustained_clients
            res = run_clients(url, n, open_loop, args.sustained_hz, args.sustained_s, n)
            rtt = [x for r in res for x in r["rtt"]]
            sustained = {
                "clients": n,
                "hz": args.sustained_hz,
                "seconds": args.sustained_s,
                "requests": len(rtt),
                "slots": int(n * int(args.sustained_s * args.sustained_hz)),
                "answered_in_order": all(r["in_order"] for r in res),
                "rtt_p50": percentiles(rtt)[0],
                "rtt_p99": percentiles(rtt)[1],
                "rtt_max": float(max(rtt)),
                "over_100ms": int(sum(x > 100 for x in rtt)),
                "missed_slots": int(sum(r["missed"] for r in res)),
            }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    print(f"\nhost: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; torch threads {args.threads}; "
          f"{args.sampler.upper()}-{args.inference_steps}, {args.backend} backend; batch wait {args.batch_wait_ms} ms")  # fmt: skip
    print(f"in-process B=1: p50 {base50:.2f} ms, p99 {base99:.2f} ms ({len(base)} calls)")
    print(f"bare websocket echo round trip (the floor): p50 {echo50:.2f} ms, p99 {echo99:.2f} ms\n")
    print("| clients | requests | in order, none lost | latency p50 / p99 (ms) | server forward p50 (ms) "
          "| overhead p50 / p99 (ms) | of which in server p50 (ms) | p50 vs in-process (ms) | mean batch "
          "| throughput (req/s) |")  # fmt: skip
    print("|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in levels:
        print(
            f"| {r['clients']} | {r['requests']} | {'yes' if r['answered_in_order'] else 'NO'} "
            f"| {r['rtt_p50']:.1f} / {r['rtt_p99']:.1f} | {r['infer_p50']:.1f} "
            f"| {r['overhead_p50']:.2f} / {r['overhead_p99']:.2f} | {r['server_side_p50']:.2f} "
            f"| {r['rtt_p50'] - base50:+.2f} "
            f"| {r['mean_batch']:.1f} | {r['throughput']:.1f} |"
        )
    if sustained:
        s = sustained
        print(
            f"\nsustained: {s['clients']} clients x {s['hz']:g} Hz for {s['seconds']:g} s: "
            f"{s['requests']} requests sent and answered in order: {'yes' if s['answered_in_order'] else 'NO'}; "
            f"latency p50 {s['rtt_p50']:.1f} ms, p99 {s['rtt_p99']:.1f} ms, max {s['rtt_max']:.1f} ms; "
            f"{s['over_100ms']} over 100 ms; {s['missed_slots']} of {s['slots']} 10 Hz slots skipped "
            "because the previous reply was still out"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "in_process_ms": base,
                    "echo_p50_ms": echo50,
                    "levels": levels,
                    "sustained": sustained,
                },
                indent=2,
            )
        )
    ok = all(r["answered_in_order"] for r in levels) and (
        not sustained or sustained["answered_in_order"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
