"""Training it/s of a CPU preset per torch thread setting, idle and with a competitor.

Why: on a 2-core machine one busy process on one core made torch's default (N threads, OpenMP
spin-waiting) 6-17x slower; this measures which setting survives. Each setting runs in its own
subprocess (OMP_WAIT_POLICY and OMP_NUM_THREADS only act when set before torch loads), through the
real loop (`training.loop.train`) with evaluation, validation and checkpoints off; it/s is read off
metrics.jsonl after --warmup steps. "contended" starts `taskset -c 0` busy Python loop first and
kills it after the setting's run.

    PYTHONPATH=$PWD python scripts/bench_threads.py --steps 60 --warmup 10 \
        --dataset /work/shared/data/pusht/pusht_cchi_v7_replay.zarr
    PYTHONPATH=$PWD python scripts/bench_threads.py --preset pusht_diffusion_image_cpu --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESET = "pusht_diffusion_state_cpu"
DEFAULT_DATA = os.environ.get("DP_PUSHT_ZARR", "/work/shared/data/pusht/pusht_cchi_v7_replay.zarr")
BUSY = "while True: pass"


ADAPTIVE = "adaptive (dp's default)"


def settings(n: int) -> list[tuple[str, dict[str, str]]]:
    """(label, environment) per setting; N-1 is 1 where the machine has 2 cores. The adaptive
    one trains with train.num_threads=0 and no OMP_NUM_THREADS: threads.py's guard."""
    nm1 = max(1, n - 1)
    return [
        ("1 thread", {"OMP_NUM_THREADS": "1"}),
        (f"N-1 = {nm1} thread(s)", {"OMP_NUM_THREADS": str(nm1)}),
        (f"N = {n} threads (torch default)", {}),
        (f"N = {n}, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
        (ADAPTIVE, {}),
    ]


def child_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment without its OpenMP settings, plus the setting's."""
    drop = ("OMP_", "GOMP_", "DP_AUTO_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | env


def child(args) -> int:
    """One measurement in this process (its env is the setting's)."""
    import torch

    from diffusion_policy.config import load_config
    from diffusion_policy.training.loop import train

    run_dir = Path(args.run_dir)
    overrides = [
        f"task.dataset={args.dataset}", "train.device=cpu", f"run_dir={run_dir}",
        f"train.max_steps={args.steps}", "train.budget_min=null", "train.time_limit_min=null",
        "train.cadence.eval_every=0", "train.cadence.final_eval=false", "train.cadence.val_every=0",
        "train.cadence.checkpoint_every=0", "train.cadence.log_every=5", "train.progress=false",
        "wandb.mode=disabled", f"train.num_threads={0 if args.adaptive else torch.get_num_threads()}",
    ]  # fmt: skip
    train(load_config(args.preset, overrides))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    first = next(r for r in rows if r["step"] >= args.warmup)
    last = rows[-1]
    its = (last["step"] - first["step"]) / max(last["time"] - first["time"], 1e-9)
    used = [r["sys/threads"] for r in rows if r["step"] >= args.warmup]
    threads = sum(used) / len(used)  # the adaptive setting's mean over the measured steps
    print("RESULT " + json.dumps({"it_s": its, "threads": round(threads, 2)}), flush=True)
    return 0


def measure(label: str, env: dict[str, str], contended: bool, args, root: Path) -> dict:
    run_dir = root / f"run_{len(list(root.iterdir()))}"
    cmd = [sys.executable, __file__, "--child", "--run-dir", str(run_dir), "--dataset", args.dataset,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--preset", args.preset]  # fmt: skip
    if label == ADAPTIVE:
        cmd.append("--adaptive")
    full_env = child_env(env)
    busy = (
        subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", BUSY]) if contended else None
    )
    try:
        t0 = time.time()
        out = subprocess.run(
            cmd, env=full_env, capture_output=True, text=True, timeout=args.timeout
        )
        wall = time.time() - t0
    except subprocess.TimeoutExpired:
        return {"label": label, "contended": contended, "error": f"over {args.timeout}s"}
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"label": label, "contended": contended, "error": out.stderr.strip()[-200:]}
    return {"label": label, "contended": contended, "wall_s": wall, **json.loads(line[7:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", default=DEFAULT_DATA)
    ap.add_argument("--preset", default=PRESET, help=f"the preset to train (default {PRESET})")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per setting")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--adaptive", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.child:
        return child(args)
    n = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    results = []
    for contended in (False, True):
        for label, env in settings(n):
            r = measure(label, env, contended, args, root)
            print(json.dumps(r), flush=True)
            results.append(r)
    shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.preset}, {args.steps} steps after {args.warmup} warm-up; {platform.machine()} "
          f"{n} cores, {platform.processor() or platform.platform()}")  # fmt: skip
    print("| setting | idle it/s | contended it/s | threads used (idle / contended) |")
    print("|---|---:|---:|---:|")
    for label, _ in settings(n):
        its, used = [], []
        for contended in (False, True):
            r = next(x for x in results if x["label"] == label and x["contended"] == contended)
            its.append(f"{r['it_s']:.2f}" if "it_s" in r else "failed")
            used.append(f"{r['threads']:g}" if "threads" in r else "-")
        print(f"| {label} | {its[0]} | {its[1]} | {used[0]} / {used[1]} |")
    print("contended: a busy `python -c 'while True: pass'` pinned with taskset -c 0")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
