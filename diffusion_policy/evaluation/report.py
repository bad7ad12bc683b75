"""`dp report RUN`: a run directory drawn as one PNG, from what training and evaluation wrote.

Drawn: train and validation loss and the learning rate against step; the loss and the eval
scores against wall time; the eval mean_score and success rate with their 95% intervals against
step; a summary; and the first and last frame of the evaluations' videos (the first frames show
the seeds' start states, the same at every evaluation; the last, where the policy left the T).
Matplotlib is imported only when a report is drawn, through its object API (no pyplot, no global
backend).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffusion_policy.evaluation.checkpoint_eval import os_reason
from diffusion_policy.evaluation.run_log import (
    OFFLINE,
    EvalPoint,
    ReportError,
    RunLog,
    read_run,
    video_frames,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_FRAME_ROWS = 3  # evaluations whose videos are shown: first, middle and last
MAX_VIDEOS = 4  # videos shown per evaluation, each as its first and last frame


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run as one PNG (RUN/report.png by default) and return its path."""
    log = read_run(run)
    out = Path(out) if out else log.run / "report.png"
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("dp report needs matplotlib: pip install matplotlib") from None
    fig = draw(log, Figure)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise ReportError(f"cannot write the report to {out}: {os_reason(e)}") from None
    return out


SCORE, SUCCESS, TRAIN, VAL, LR = "tab:blue", "tab:green", "tab:blue", "tab:orange", "tab:purple"


def draw(log: RunLog, figure: type[Figure]) -> Figure:
    """Losses, learning rate and eval scores (step and wall time), a summary, and video frames."""
    shown = _evals_with_videos(log.evals)
    fig = figure(figsize=(16, 8.5 + 2.4 * len(shown)), layout="constrained")
    gs = fig.add_gridspec(2 + len(shown), 3, height_ratios=[1, 1] + [0.62] * len(shown))
    fig.suptitle(f"run {log.run}", fontsize=13, fontweight="bold")
    scale, unit = _time_unit(log)
    _losses(fig.add_subplot(gs[0, 0]), log, by_time=False, scale=scale, unit=unit)
    _lr(fig.add_subplot(gs[0, 1]), log)
    _losses(fig.add_subplot(gs[0, 2]), log, by_time=True, scale=scale, unit=unit)
    _scores(fig.add_subplot(gs[1, 0]), log, by_time=False, scale=scale, unit=unit)
    _scores(fig.add_subplot(gs[1, 1]), log, by_time=True, scale=scale, unit=unit)
    _summary(fig.add_subplot(gs[1, 2]), log, unit, scale)
    for row, point in enumerate(shown):
        _frames(fig, gs[2 + row, :], point)
    return fig


def _time_unit(log: RunLog) -> tuple[float, str]:
    longest = max(
        [float(np.nanmax(s[1])) for s in log.series.values() if len(s) and np.isfinite(s[1]).any()]
        + [p.wall_s for p in log.evals if p.wall_s is not None]
        + [0.0]
    )
    if longest >= 2 * 3600:
        return 3600.0, "h"
    return (60.0, "min") if longest >= 120 else (1.0, "s")


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _losses(ax: Axes, log: RunLog, *, by_time: bool, scale: float, unit: str) -> None:
    ax.set_title("loss against wall time" if by_time else "loss against step")
    ax.set_xlabel(f"training wall time ({unit})" if by_time else "step")
    drawn = []
    for key, color, marker in (("train/loss", TRAIN, None), ("val/loss", VAL, "o")):
        s = log.series.get(key)
        if not s:
            continue
        x = s[1] / scale if by_time else s[0]
        ax.plot(x, s[2], color=color, marker=marker, ms=3, lw=1.3, label=key)
        drawn.append(s[2])
    if not drawn:
        return _empty(ax, "no training log yet")
    values = np.concatenate(drawn)
    if (values > 0).all() and values.max() > 10 * values.min():
        ax.set_yscale("log")
    _integer_steps(ax, by_time)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right")


def _lr(ax: Axes, log: RunLog) -> None:
    ax.set_title("learning rate")
    ax.set_xlabel("step")
    s = log.series.get("train/lr")
    if not s:
        return _empty(ax, "no training log yet")
    ax.plot(s[0], s[2], color=LR, lw=1.3)
    _integer_steps(ax, False)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)


def _scores(ax: Axes, log: RunLog, *, by_time: bool, scale: float, unit: str) -> None:
    if not log.evals and log.series.get(OFFLINE):
        return _offline(ax, log, by_time=by_time, scale=scale, unit=unit)
    ax.set_title("evaluation against wall time" if by_time else "evaluation against step")
    ax.set_xlabel(f"training wall time ({unit})" if by_time else "step")
    ax.set_ylim(-0.03, 1.03)
    pts = [p for p in log.evals if not by_time or p.wall_s is not None]
    x = np.asarray([p.wall_s / scale if by_time else p.step for p in pts], dtype=float)
    for name, color in (("mean_score", SCORE), ("success_rate", SUCCESS)):
        y = np.asarray([_num(getattr(p, name)) for p in pts], dtype=float)
        if not np.isfinite(y).any():
            continue
        ci = np.asarray([getattr(p, f"{name}_ci95") or [v, v] for p, v in zip(pts, y)], dtype=float)
        yerr = np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y]))
        style = dict(color=color, marker="o", ms=4, lw=1.5, capsize=3)
        ax.errorbar(x, y, yerr=yerr, label=f"{name} (bars: 95% CI)", **style)
        if len(pts) > 1:
            ax.fill_between(x, ci[:, 0], ci[:, 1], color=color, alpha=0.15)
    if not by_time and log.failed_evals:
        ax.plot(log.failed_evals, [0.0] * len(log.failed_evals), "rx", ms=8, label="eval failed")
    if not pts and not (log.failed_evals and not by_time):
        return _empty(ax, "no evaluation yet")
    _integer_steps(ax, by_time)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def _offline(ax: Axes, log: RunLog, *, by_time: bool, scale: float, unit: str) -> None:
    """A task without a simulator: the held-out action MSE (normalised units), lower is better."""
    s = log.series[OFFLINE]
    ax.set_title(f"offline validation against {'wall time' if by_time else 'step'}")
    ax.set_xlabel(f"training wall time ({unit})" if by_time else "step")
    ax.plot(s[1] / scale if by_time else s[0], s[2], color=SCORE, marker="o", ms=4, lw=1.5, label=OFFLINE)  # fmt: skip
    if (s[2] > 0).all() and s[2].max() > 10 * s[2].min():
        ax.set_yscale("log")
    ax.set_ylabel("held-out action MSE (normalised; lower is better)", fontsize=8)
    _integer_steps(ax, by_time)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right", fontsize=8)


def _integer_steps(ax: Axes, by_time: bool) -> None:
    if not by_time:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else math.nan


def _summary(ax: Axes, log: RunLog, unit: str, scale: float) -> None:
    ax.axis("off")
    ax.set_title("summary")
    lines = _config_lines(log.run / "config.yaml")
    loss = log.series.get("train/loss")
    if loss:
        lines.append(f"steps logged: {int(loss[0][-1])}")
        if np.isfinite(loss[1]).any():
            lines.append(f"training wall time: {np.nanmax(loss[1]) / scale:.1f} {unit}")
        lines.append(f"last train/loss: {loss[2][-1]:.4f}")
    val = log.series.get("val/loss")
    if val:
        lines.append(f"last val/loss: {val[2][-1]:.4f} (step {int(val[0][-1])})")
    if log.evals:
        best = max(log.evals, key=lambda p: (p.mean_score, -p.step))
        ci = best.mean_score_ci95
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        lines.append(f"evaluations: {len(log.evals)}")
        lines.append(f"best mean_score: {best.mean_score:.3f}{interval} at step {best.step}")
        last = log.evals[-1]
        lines.append(f"last mean_score: {last.mean_score:.3f} at step {last.step}")
    elif log.series.get(OFFLINE):
        steps, _, mse = log.series[OFFLINE]
        i = int(np.argmin(mse))
        lines.append(f"offline evaluations: {len(mse)}")
        lines.append(f"best {OFFLINE}: {mse[i]:.4g} at step {int(steps[i])}")
        lines.append(f"last {OFFLINE}: {mse[-1]:.4g} at step {int(steps[-1])}")
    else:
        lines.append("no evaluation yet")
    if log.failed_evals:
        lines.append(f"failed evaluations at steps {log.failed_evals[:6]}")
    if log.skipped_lines:
        lines.append(f"{log.skipped_lines} unreadable line(s) in metrics.jsonl skipped")
    text = "\n".join(lines)
    ax.text(0.02, 0.98, text, va="top", ha="left", family="monospace", transform=ax.transAxes)


def _config_lines(path: Path) -> list[str]:
    """preset, policy and observation from config.yaml, when it is there and readable."""
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # a missing or damaged config only loses these lines
        return []
    if not isinstance(cfg, dict):
        return []
    policy, task = cfg.get("policy") or {}, cfg.get("task") or {}
    return [
        f"preset: {cfg.get('preset')}",
        f"policy: {policy.get('name')}, obs: {task.get('obs_type')}",
    ]


def _evals_with_videos(evals: list[EvalPoint]) -> list[EvalPoint]:
    """The first, middle and last evaluation that recorded videos."""
    with_videos = [p for p in evals if p.videos]
    if len(with_videos) <= MAX_FRAME_ROWS:
        return with_videos
    idx = np.linspace(0, len(with_videos) - 1, MAX_FRAME_ROWS).round().astype(int)
    return [with_videos[i] for i in sorted(set(idx))]


def _frames(fig: Figure, cell: Any, point: EvalPoint) -> None:
    """One row: each video's first and last frame, labelled with its seed and the step's score."""
    videos = point.videos[:MAX_VIDEOS]
    sub = cell.subgridspec(1, 2 * MAX_VIDEOS, wspace=0.04)
    for i, path in enumerate(videos):
        frames = video_frames(path)
        seed = path.stem.removeprefix("seed_")
        for j, label in enumerate(("start", "end")):
            ax = fig.add_subplot(sub[0, 2 * i + j])
            ax.set_xticks([])
            ax.set_yticks([])
            if frames is None:
                _empty(ax, "unreadable")
            else:
                ax.imshow(frames[j])
            ax.set_title(f"seed {seed} {label}", fontsize=9)
            if i == 0 and j == 0:
                ax.set_ylabel(f"step {point.step}\nscore {point.mean_score:.2f}", fontsize=10)
