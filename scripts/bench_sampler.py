"""Score against latency for each sampler setting of one or more checkpoints: the table behind
"how few denoising steps can we afford".

For every (checkpoint, sampler, steps, spacing) row it runs the paper's evaluation (`dp eval`: 50
episodes on seeds 100000..) and times one action chunk at batch 1 on the chosen backend (median and
p90 over --repeats chunks after warm-up). Rows are cached in --out (one JSON per row), so a long
sweep can be stopped and resumed, and the table re-printed with --table-only.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sampler.py runs/X/checkpoints/latest \
        --rows ddpm:100 ddim:100 ddim:16 ddim:10 ddim:8 ddim:4 ddim:2 ddim:1 --spacings leading trailing
    .venv/bin/python scripts/bench_sampler.py CKPT --rows ddim:2 --spacings trailing --latency-only
    .venv/bin/python scripts/bench_sampler.py CKPT ... --latency-only --remeasure   # on a quiet machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def chunk_latency(
    ckpt: str, sampler: str, steps: int, spacing: str, backend: str, device: str, repeats: int
) -> tuple[float, float]:
    """Median and p90 ms of predict_action_chunk at batch 1 (fresh noise each call)."""
    from diffusion_policy.checkpoint import load_policy

    policy, _, _ = load_policy(ckpt, device=device)
    policy.set_sampler(sampler, steps, spacing)
    policy.set_inference_backend(backend if sampler == "ddim" else "eager")
    obs = {
        k: (
            torch.randint(0, 255, (1, policy.config.n_obs_steps, *s.shape), dtype=torch.uint8)
            if s.kind == "rgb"
            else torch.rand(1, policy.config.n_obs_steps, *s.shape) * 400 + 50
        ).to(device)
        for k, s in policy.shape_meta.obs.items()
    }
    gen = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(repeats + 5):
        t0 = time.perf_counter()
        policy.predict_action_chunk(obs, generator=gen)["action"].cpu()
        sync()
        if i >= 5:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--rows", nargs="+", default=["ddpm:100", "ddim:100", "ddim:16", "ddim:10", "ddim:8", "ddim:4"])  # fmt: skip
    ap.add_argument("--spacings", nargs="+", default=["leading"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default="runs/bench_sampler")
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--remeasure", action="store_true", help="time the cached rows' latency again")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ckpt in args.checkpoints:
        for spec in args.rows:
            sampler, steps = spec.split(":")
            for spacing in args.spacings if sampler == "ddim" else ["leading"]:
                name = f"{Path(ckpt).resolve().parent.parent.name}_{Path(ckpt).resolve().name}_{sampler}{steps}_{spacing}"
                cache = out / f"{name}.json"
                row = json.loads(cache.read_text()) if cache.exists() else {}
                row.update(ckpt=ckpt, sampler=sampler, steps=int(steps), spacing=spacing)
                if not args.table_only and "score" not in row and not args.latency_only:
                    ev = out / name
                    cmd = [sys.executable, "-m", "diffusion_policy.cli.main", "eval", ckpt, "--sampler", sampler,
                           "--inference-steps", steps, "--timestep-spacing", spacing, "--backend", args.backend,
                           "--episodes", str(args.episodes), "--videos", "0", "--device", args.device, "--out", str(ev)]  # fmt: skip
                    subprocess.run(cmd, check=True)
                    m = json.loads((ev / "metrics.json").read_text())
                    row.update(
                        score=m["mean_score"], ci95=m["mean_score_ci95"], success=m["success_rate"]
                    )
                if not args.table_only and ("latency_ms" not in row or args.remeasure):
                    p50, p90 = chunk_latency(ckpt, sampler, int(steps), spacing, args.backend, args.device, args.repeats)  # fmt: skip
                    row.update(latency_ms=p50, latency_p90_ms=p90, backend=args.backend, device=args.device,
                               load=os.getloadavg()[0])  # fmt: skip
                cache.write_text(json.dumps(row, indent=1))
                rows.append(row)
    print(f"\n{'checkpoint':<34} {'sampler':>8} {'steps':>5} {'spacing':>8} {'mean_score [95% CI]':>22} {'success':>7} {'chunk ms p50/p90':>17}")  # fmt: skip
    for r in rows:
        score = (
            f"{r['score']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if "score" in r else "-"
        )
        succ = f"{r['success']:.2f}" if "success" in r else "-"
        lat = f"{r['latency_ms']:.1f} / {r['latency_p90_ms']:.1f}" if "latency_ms" in r else "-"
        print(f"{Path(r['ckpt']).resolve().parent.parent.name[-34:]:<34} {r['sampler']:>8} {r['steps']:>5} {r['spacing']:>8} {score:>22} {succ:>7} {lat:>17}")  # fmt: skip
    print(f"(latency: batch 1, backend {args.backend}, {args.device}, {torch.get_num_threads()} thread(s); load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
