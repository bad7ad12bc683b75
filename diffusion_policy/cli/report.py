"""`dp report RUN`: draw a run directory (losses, learning rate, eval scores, video frames) as one PNG."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", help="run directory (what `dp train` wrote: metrics.jsonl, eval/ ...)"
    )
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN/report.png)")


def run(args: argparse.Namespace) -> int:
    from diffusion_policy.evaluation.report import write_report

    print(f"wrote {write_report(args.run, args.out)}")
    return 0
