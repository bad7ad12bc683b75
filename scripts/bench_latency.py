"""Execution strategies under a controlled inference delay: score and smoothness, one table.

Why: on a robot the next chunk arrives while the current one executes; which way of joining the two
keeps the score depends on the delay. Every row is `dp eval CKPT --delay D --strategy S` (the
deterministic tick-counter evaluation, the paper's 50 test seeds), run in this one process so a
table compares like with like. Rows are appended to --json as they finish (a long run that is
stopped keeps what it measured; rerunning skips rows already there), and the table and a plot of
mean_score against delay are made from that file.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/bench_latency.py CKPT --json runs/latency.json \
        --label "DDIM-10" --sampler ddim --inference-steps 10 --delays 0 1 2 3 4 6
    python scripts/bench_latency.py --json runs/latency.json --table --plot docs/latency.png
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

STRATEGIES = ("sync", "async", "ensemble", "rtc", "bid")


def _key(row: dict[str, Any]) -> tuple:
    return (row["label"], row["strategy"], row["delay"], row["n_action_steps"], row.get("variant"))


def _evaluate(checkpoint: str, opts: Any) -> dict[str, Any]:
    from diffusion_policy.evaluation.checkpoint_eval import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, opts)[0]


def run_rows(args: argparse.Namespace) -> None:
    from diffusion_policy.evaluation.checkpoint_eval import EvalOptions

    path = Path(args.json[0])
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {_key(r) for r in rows}
    for delay in args.delays:
        for strategy in args.strategies:
            variant = {
                "bid": f"n={args.bid_samples}",
                "rtc": f"beta={args.rtc_beta:g}",
                "ensemble": f"m={args.ensemble_decay:g}",
            }.get(strategy)
            row = {"label": args.label, "strategy": strategy, "delay": delay,
                   "n_action_steps": args.n_action_steps, "variant": variant}  # fmt: skip
            if _key(row) in done:
                continue
            opts = EvalOptions(
                episodes=args.episodes, videos=0, out=f"{args.out}/{args.label}",
                sampler=args.sampler, inference_steps=args.inference_steps,
                timestep_spacing=args.timestep_spacing, delay=delay, strategy=strategy,
                n_action_steps=args.n_action_steps,
                bid_samples=args.bid_samples if strategy == "bid" else None,
                rtc_beta=args.rtc_beta if strategy == "rtc" else None,
                ensemble_decay=args.ensemble_decay if strategy == "ensemble" else None,
                seed=args.seed,
            )  # fmt: skip
            # each row in a fresh process: compiled samplers of earlier rows never pile up
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                m = pool.submit(_evaluate, args.checkpoint, opts).result()
            s = m["smoothness"]
            row.update(
                mean_score=m["mean_score"], ci=m["mean_score_ci95"], success=m["success_rate"],
                seam_mean=s["seam_jump_mean"], seam_p95=s["seam_jump_p95"],
                inside_mean=s["inside_jump_mean"], inside_p95=s["inside_jump_p95"],
                dropped=s["dropped_actions"], held=s["hold_ticks"], wall_s=m["wall_time_s"],
                checkpoint=str(args.checkpoint), machine=f"{platform.machine()}, {_cores()} cores",
            )  # fmt: skip
            rows.append(row)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=1))
            print(_line(row), flush=True)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _f(x: float | None, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


HEADER = (
    "| policy | Ta | strategy | delay d | mean_score [95% CI] | success | seam jump mean / p95 "
    "| inside jump mean / p95 | stale dropped | eval s |\n|---|---:|---|---:|---|---:|---|---|---:|---:|"
)


def _line(r: dict[str, Any]) -> str:
    name = r["strategy"] + (f" ({r['variant']})" if r.get("variant") else "")
    ci = r["ci"]
    return (
        f"| {r['label']} | {r['n_action_steps'] or 'ckpt'} | {name} | {r['delay']} | "
        f"{r['mean_score']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {r['success']:.2f} | "
        f"{_f(r['seam_mean'])} / {_f(r['seam_p95'])} | {_f(r['inside_mean'])} / {_f(r['inside_p95'])} | "
        f"{r['dropped']} | {r['wall_s']:.0f} |"
    )


def table(rows: list[dict[str, Any]]) -> str:
    """One markdown table per (policy, Ta), rows by delay then strategy."""
    order = lambda r: (r["delay"], STRATEGIES.index(r["strategy"]), r.get("variant") or "")  # noqa: E731
    groups = sorted({(r["label"], r["n_action_steps"] or 0) for r in rows})
    ckpt_ta = "the checkpoint's"
    out = []
    for label, ta in groups:
        mine = sorted((r for r in rows if (r["label"], r["n_action_steps"] or 0) == (label, ta)), key=order)  # fmt: skip
        out += [
            f"**{label}, Ta = {ta or ckpt_ta}**",
            "",
            HEADER,
            *(_line(r) for r in mine),
            "",
        ]
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], out: str) -> None:
    """Top: mean_score against delay; bottom: the mean action jump at chunk seams (inside chunks
    dotted), one column per (policy, Ta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["label"], r["n_action_steps"] or 0) for r in rows}, key=str)
    names = sorted({(r["strategy"], r.get("variant")) for r in rows}, key=str)
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 8), squeeze=False)
    for col, (label, ta) in enumerate(groups):
        mine = [r for r in rows if (r["label"], r["n_action_steps"] or 0) == (label, ta)]
        top, bottom = axes[0][col], axes[1][col]
        for name in sorted({(r["strategy"], r.get("variant")) for r in mine}, key=str):
            pts = sorted((r["delay"], r) for r in mine if (r["strategy"], r.get("variant")) == name)
            d = [p[0] for p in pts]
            score = [p[1]["mean_score"] for p in pts]
            err = [[s - p[1]["ci"][0] for s, p in zip(score, pts)], [p[1]["ci"][1] - s for s, p in zip(score, pts)]]  # fmt: skip
            text = name[0] + (f" {name[1]}" if name[1] else "")
            colour = f"C{names.index(name)}"  # one colour per strategy in every panel
            top.errorbar(d, score, yerr=err, marker="o", capsize=3, label=text, color=colour)
            bottom.plot(d, [p[1]["seam_mean"] for p in pts], marker="o", label=text, color=colour)
            bottom.plot(d, [p[1]["inside_mean"] for p in pts], ls=":", color=colour)
        title = f"{label}, Ta = {ta or 'the checkpoint s (8)'}".replace(
            "checkpoint s", "checkpoint's"
        )
        top.set_title(title)
        top.set_ylabel("mean_score (50 seeds, 95% CI)")
        bottom.set_ylabel("mean action jump at seams (solid) / inside chunks (dotted), px")
        for ax in (top, bottom):
            ax.set_xlabel("inference delay d (control steps, 100 ms each)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "checkpoint", nargs="?", help="checkpoint to evaluate (omit with --table/--plot)"
    )
    p.add_argument("--json", required=True, action="append",
                   help="rows are appended to the first; rows already in it are skipped; --table and "
                   "--plot read every one given (measurements made by several processes)")  # fmt: skip
    p.add_argument("--label", default="policy")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--delays", nargs="+", type=int, default=[0, 1, 2, 3, 4, 6])
    p.add_argument("--n-action-steps", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--inference-steps", type=int, default=None)
    p.add_argument("--timestep-spacing", default=None)
    p.add_argument("--bid-samples", type=int, default=16)
    p.add_argument("--rtc-beta", type=float, default=5.0)
    p.add_argument("--ensemble-decay", type=float, default=0.01)
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default="/tmp/dp_latency", help="evaluation output directories")
    p.add_argument("--table", action="store_true", help="print the table of every row in --json")
    p.add_argument("--plot", default=None, help="write mean_score against delay to this PNG")
    args = p.parse_args(argv)
    if args.checkpoint:
        run_rows(args)
    rows = [r for f in args.json if Path(f).exists() for r in json.loads(Path(f).read_text())]
    rows = list(
        {_key(r): r for r in reversed(rows)}.values()
    )  # a row measured twice: the first file's
    if args.table or not args.checkpoint:
        print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
