"""What a run directory holds, read for `dp report` (report.py draws it).

Read: RUN/metrics.jsonl (one JSON object per event: train/loss, train/lr, time/elapsed_s, val/loss,
eval/mean_score, eval/error ...; a line cut short by a kill is skipped) and the training loop's
evaluations RUN/eval/step_N/ (metrics.json with the 95% intervals, videos/seed_S.mp4; `dp eval`'s
own results, RUN/eval/step_N-..., are not the training curve and are left out). Wall time is the
training's own clock, so the days between a stop and a resume leave no gap.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.errors import UserError


class ReportError(UserError):
    """The directory is not a run, or the report cannot be written."""


@dataclass
class EvalPoint:
    """One of the training loop's evaluations."""

    step: int
    mean_score: float
    mean_score_ci95: list[float] | None = None
    success_rate: float | None = None
    success_rate_ci95: list[float] | None = None
    wall_s: float | None = None
    videos: list[Path] = field(default_factory=list)


@dataclass
class RunLog:
    """What a run directory holds, as series ready to draw."""

    run: Path
    series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # key -> (steps, wall_s, values)
    evals: list[EvalPoint]
    failed_evals: list[int]  # steps whose evaluation failed (eval/error)
    skipped_lines: int


def check_run_dir(run: Path) -> None:
    """One clear line for anything that is not a run directory."""
    if not run.exists():
        raise ReportError(f"{run} does not exist")
    if not run.is_dir():
        raise ReportError(f"{run} is not a run directory (it is a file)")
    if (run / "meta.json").is_file() and (run / "model.safetensors").is_file():
        raise ReportError(f"{run} is a checkpoint; give the run directory that holds checkpoints/")
    if not (run / "metrics.jsonl").is_file() and not (run / "config.yaml").is_file():
        raise ReportError(
            f"{run} is not a run directory: it has neither metrics.jsonl nor config.yaml "
            "(what `dp train` writes)"
        )


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    rows, skipped = [], 0
    if not path.is_file():
        return rows, skipped
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int | float):
            rows.append(row)
        elif line.strip():
            skipped += 1
    return rows, skipped


def _training_clock(rows: list[dict[str, Any]]) -> Callable[[float], float]:
    """time -> seconds of training: each session (a start or a resume) runs its own clock from
    `time - time/elapsed_s`; sessions are laid end to end, so the gaps between them vanish."""
    starts: list[float] = []
    for r in rows:
        if isinstance(r.get("time/elapsed_s"), int | float) and "time" in r:
            s = r["time"] - r["time/elapsed_s"]
            if not starts or abs(s - starts[-1]) > 1.0:
                starts.append(s)
    ends = list(starts)
    for r in rows:
        if "time" in r and starts:
            i = _session(starts, r["time"])
            ends[i] = max(ends[i], r["time"])
    offsets = np.concatenate([[0.0], np.cumsum([e - s for s, e in zip(starts, ends)])])

    def clock(t: float) -> float:
        if not starts:
            return math.nan
        i = _session(starts, t)
        return float(offsets[i] + max(0.0, t - starts[i]))

    return clock


def _session(starts: list[float], t: float) -> int:
    """Index of the last session started by time t (a second of slack for rounding)."""
    return max(0, int(np.searchsorted(starts, t + 1.0, side="right")) - 1)


OFFLINE = "offline/action_mse_norm"  # what a task without a simulator is evaluated by


def read_run(run: str | Path) -> RunLog:
    """Collect the series and evaluations of a run directory (refusing anything that is not one)."""
    run = Path(run)
    check_run_dir(run)
    rows, skipped = _read_jsonl(run / "metrics.jsonl")
    clock = _training_clock(rows)
    series = {}
    for key in ("train/loss", "val/loss", "train/lr", OFFLINE):
        pts = [
            (r["step"], clock(r["time"]) if "time" in r else math.nan, r[key])
            for r in rows
            if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]
        series[key] = tuple(np.asarray(c, dtype=float) for c in zip(*pts)) if pts else ()
    logged = {int(r["step"]): r for r in rows if "eval/mean_score" in r}
    failed = sorted({int(r["step"]) for r in rows if "eval/error" in r})
    return RunLog(run, series, _read_evals(run, logged, clock), failed, skipped)


def _read_evals(
    run: Path, logged: dict[int, dict[str, Any]], clock: Callable[[float], float]
) -> list[EvalPoint]:
    """The training loop's evaluations: eval/step_N/metrics.json, else the logged score alone."""
    points: dict[int, EvalPoint] = {}
    for step, r in logged.items():
        points[step] = EvalPoint(
            step, float(r["eval/mean_score"]), success_rate=r.get("eval/success_rate")
        )
    for d in sorted((run / "eval").glob("step_*")):
        m = re.fullmatch(r"step_(\d+)", d.name)  # dp eval's own results are named step_N-...
        if not m:
            continue
        step = int(m.group(1))
        try:
            metrics = json.loads((d / "metrics.json").read_text())
            p = EvalPoint(
                step,
                float(metrics["mean_score"]),
                metrics.get("mean_score_ci95"),
                metrics.get("success_rate"),
                metrics.get("success_rate_ci95"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            p = points.get(step)
            if p is None:
                continue
        p.videos = sorted((d / "videos").glob("*.mp4"))
        points[step] = p
    for p in points.values():
        if p.step in logged and "time" in logged[p.step]:
            p.wall_s = clock(logged[p.step]["time"])
    return [points[s] for s in sorted(points)]


def video_frames(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last frame of a video as RGB arrays; None if it cannot be read (still being
    written, or damaged)."""
    import av

    first = last = None
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                last = frame.to_ndarray(format="rgb24")
                if first is None:
                    first = last
    except (av.error.FFmpegError, OSError, ValueError):
        return None
    return None if first is None else (first, last)
