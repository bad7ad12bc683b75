"""Scores of a set of episodes, with 95% intervals, and the metrics.json that records them."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

# an episode succeeds once the T covers more than this fraction of the goal (reward 1 from here)
SUCCESS_COVERAGE = 0.95


def _interval(values: np.ndarray) -> list[float]:
    """95% normal-approximation confidence interval of a mean of values in [0, 1]."""
    n = len(values)
    if n < 2:
        return [float(values.mean()), float(values.mean())]
    half = 1.96 * values.std(ddof=1) / math.sqrt(n)
    return [max(0.0, float(values.mean() - half)), min(1.0, float(values.mean() + half))]


def _wilson(successes: int, n: int) -> list[float]:
    """95% Wilson interval of a rate; sane at 0 and 1 unlike the normal approximation."""
    z = 1.96
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def summarize(
    seeds: list[int],
    max_reward: np.ndarray,
    success: np.ndarray,
    final_cov: np.ndarray,
    steps: np.ndarray,
) -> dict[str, Any]:
    """The paper's score (mean of each episode's max reward) and the rates, with their intervals."""
    n = len(seeds)
    return {
        "mean_score": float(max_reward.mean()),
        "mean_score_ci95": _interval(max_reward),
        "success_rate": float(success.mean()),
        "success_rate_ci95": _wilson(int(success.sum()), n),
        "mean_final_coverage": float(final_cov.mean()),
        "mean_final_coverage_ci95": _interval(final_cov),
        "n_episodes": n,
        "per_seed": {
            str(s): {
                "max_reward": float(r),
                "success": bool(ok),
                "final_coverage": float(c),
                "steps": int(k),
            }
            for s, r, ok, c, k in zip(seeds, max_reward, success, final_cov, steps)
        },
    }


def finish_metrics(
    metrics: dict[str, Any],
    *,
    started: float,
    seed_start: int,
    out: Path | None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add the wall time, first seed and `info` (what was evaluated, how), and write metrics.json."""
    metrics["wall_time_s"] = round(time.time() - started, 2)
    metrics["seed_start"] = seed_start
    metrics.update(info or {})
    if out:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
