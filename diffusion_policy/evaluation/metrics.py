"""Scores of a set of episodes, with 95% intervals, and the metrics.json that records them."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np


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


class EpisodeStats:
    """The results of n episodes stepped together, read from what the env says of itself: its
    metadata's `success_key` (default is_success), `event_keys` (Block Pushing's p1, p2: reached at
    some step) and `mode_key` (the behaviour mode reached), and info["coverage"] where it has one
    (Push-T). So one evaluation serves every task, with no branch per task."""

    def __init__(self, n: int, metadata: dict[str, Any], info: dict[str, Any]):
        self.success_key = metadata.get("success_key", "is_success")
        self.event_keys = tuple(metadata.get("event_keys", ()))
        self.mode_key = metadata.get("mode_key")
        self.max_reward = np.zeros(n)
        self.success = np.zeros(n, bool)
        self.steps = np.zeros(n, int)
        cov = info.get("coverage")
        self.final_cov = None if cov is None else np.asarray(cov, dtype=float).reshape(n).copy()
        self.events = {k: np.zeros(n, bool) for k in self.event_keys}
        self.modes = np.full(n, "", dtype=object)

    def step(self, reward: Any, info: dict[str, Any], live: np.ndarray) -> None:
        """One env step's reward and info (arrays over the n envs, or scalars for one) for the envs
        still running (`live`)."""
        n = len(self.steps)
        self.max_reward[live] = np.maximum(self.max_reward, np.asarray(reward, float).reshape(n))[
            live
        ]
        if self.success_key not in info:
            raise KeyError(
                f"the env's info has no {self.success_key!r} (its metadata's success_key)"
            )
        self.success[live] |= np.asarray(info[self.success_key], bool).reshape(n)[live]
        if self.final_cov is not None:
            self.final_cov[live] = np.asarray(info["coverage"], float).reshape(n)[live]
        for k, reached in self.events.items():
            reached[live] |= np.asarray(info[k], bool).reshape(n)[live]
        if self.mode_key:
            self.modes[live] = np.asarray(info[self.mode_key], dtype=object).reshape(n)[live]
        self.steps[live] += 1

    def rows(self) -> list[dict[str, Any]]:
        """One dict per episode: max_reward, success, steps, final_coverage, each event, mode."""
        out = []
        for i in range(len(self.steps)):
            row = {"max_reward": float(self.max_reward[i]), "success": bool(self.success[i])}
            if self.final_cov is not None:
                row["final_coverage"] = float(self.final_cov[i])
            row.update({k: bool(v[i]) for k, v in self.events.items()})
            if self.mode_key:
                row["mode"] = str(self.modes[i]) or "none"
            row["steps"] = int(self.steps[i])
            out.append(row)
        return out


def summarize(seeds: list[int], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's score (mean of each episode's max reward) and the rates, with their intervals;
    each event's rate (p1, p2) and the frequency of each mode where the env reports them."""
    n = len(seeds)
    col = {k: np.asarray([r[k] for r in rows]) for k in rows[0] if k != "mode"} if rows else {}
    max_reward, success = col["max_reward"], col["success"]
    out: dict[str, Any] = {
        "mean_score": float(max_reward.mean()),
        "mean_score_ci95": _interval(max_reward),
        "success_rate": float(success.mean()),
        "success_rate_ci95": _wilson(int(success.sum()), n),
    }
    if "final_coverage" in col:
        out["mean_final_coverage"] = float(col["final_coverage"].mean())
        out["mean_final_coverage_ci95"] = _interval(col["final_coverage"])
    for k in [k for k in col if k not in ("max_reward", "success", "final_coverage", "steps")]:
        out[f"{k}_rate"] = float(col[k].mean())
        out[f"{k}_rate_ci95"] = _wilson(int(col[k].sum()), n)
    if rows and "mode" in rows[0]:
        modes = [r["mode"] for r in rows]
        out["mode_frequencies"] = {m: modes.count(m) / n for m in sorted(set(modes))}
    out["n_episodes"] = n
    out["per_seed"] = {str(s): r for s, r in zip(seeds, rows)}
    return out


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
