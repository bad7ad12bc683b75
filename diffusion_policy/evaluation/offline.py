"""Validation without a simulator: score a policy against held-out demonstrations.

A task whose `env_id` is null (a real robot's demonstrations) cannot be rolled out, so the training
loop and `dp eval` measure instead, on episodes the policy never trained on:
  * the diffusion (training) loss with fixed noise, as `val/loss`;
  * the MSE of sampled action chunks against the demonstrated ones, per action dimension, in the
    action's own units, over the executed slice [To-1, To-1+Ta) and over the whole horizon T;
    the mean over dimensions in the policy's normalised units ([-1, 1] for min-max), so that
    dimensions in different units (metres, radians, a gripper) weigh the same, ranks checkpoints;
  * for `dp eval`, each plotted episode replayed chunk by chunk: the policy sees the demonstration's
    observations at steps 0, Ta, 2Ta, ... and its executed chunks are laid end to end against the
    demonstrated actions (open loop: the observations are the demonstrator's, not the policy's).
All sampling is seeded, so the numbers are a function of (weights, episodes, seed, batch size, device).

What is used of a dataset (data/datasets.py): `len`, `get_batch(idx)` (idx on `.device`) giving
{"obs": {key: (B, To, ...)}, "action": (B, T, Da)}, `episode_ends`, `episode_mask` (the episodes it
holds) and `view(mask)` (the same frames, other episodes), whose windows run in time order, window i
of an episode executing its frames [i, i + Ta).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffusion_policy.errors import DataError
from diffusion_policy.training.build import Dist, to_device, training_noise

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RANK_KEY = "action_mse_norm"  # the metric best checkpoints are kept by: lower is better
MAX_WINDOWS = 256  # held-out windows sampled per evaluation, evenly spaced over them all
PLOT_EPISODES = 4  # rows of the trajectory plot
PLOT_DIMS = 8  # columns of the trajectory plot
PREDICTED = "predicted: a chunk from the demonstration's observations every Ta steps (grey lines)"


@torch.no_grad()
def heldout_loss(
    policy, ds, batch_size: int, seed: int, device: str, max_batches: int = 8
) -> float:
    """The training loss on the first `max_batches` batches of `ds`, with the noise fixed per batch."""
    losses = []
    for i in range(min(max_batches, math.ceil(len(ds) / batch_size))):
        idx = torch.arange(i * batch_size, min((i + 1) * batch_size, len(ds)), device=ds.device)
        batch = to_device(ds.get_batch(idx), device)
        batch.update(training_noise(policy, len(idx), 10**9 + i, seed, Dist(), device))
        losses.append(float(policy.compute_loss(batch)))
    return float(np.mean(losses))


class _SquaredError:
    """Per-dimension sums of squared errors, raw and normalised, and their count."""

    def __init__(self, normalize):
        self.normalize, self.raw, self.norm, self.n = normalize, 0.0, 0.0, 0

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.raw = self.raw + ((pred - target) ** 2).reshape(-1, pred.shape[-1]).sum(0).double()
        d = self.normalize(pred) - self.normalize(target)
        self.norm = self.norm + (d**2).reshape(-1, pred.shape[-1]).sum(0).double()
        self.n += pred[..., 0].numel()

    def metrics(self, name: str) -> dict[str, Any]:
        per_dim = (self.raw / self.n).tolist()
        return {
            f"{name}_mse": float(np.mean(per_dim)),
            f"{name}_mse_norm": float((self.norm / self.n).mean()),
            f"{name}_mse_per_dim": per_dim,
        }


@torch.no_grad()
def offline_metrics(
    policy, ds, batch_size: int, seed: int, device: str, max_windows: int = MAX_WINDOWS
) -> dict[str, Any]:
    """The held-out loss and the action MSE of `policy` on `ds` (its windows, at most
    `max_windows` of them, evenly spaced); per-dimension lists under *_per_dim."""
    if len(ds) == 0:
        raise DataError("no held-out windows: every held-out episode is shorter than the horizon")
    policy.eval()
    norm = lambda x: policy.normalizer.normalize("action", x)  # noqa: E731
    executed, horizon = _SquaredError(norm), _SquaredError(norm)
    n = min(len(ds), max_windows)
    idx = torch.from_numpy(np.linspace(0, len(ds) - 1, n).round().astype(np.int64))
    for i, chunk in enumerate(idx.split(batch_size)):
        batch = to_device(ds.get_batch(chunk.to(ds.device)), device)
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        pred = policy.predict_action_chunk(batch["obs"], generator=g)
        executed.add(pred["action"], batch["action"][:, policy.executed_slice()])
        horizon.add(pred["action_pred"], batch["action"])
    loss = heldout_loss(policy, ds, batch_size, seed, device)
    return {"loss": loss, **executed.metrics("action"), **horizon.metrics("horizon"), "windows": n}


def flat(metrics: dict[str, Any], prefix: str = "offline/") -> dict[str, float]:
    """One number per key, for metrics.jsonl and wandb: per-dimension lists become key_d0, key_d1..."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, list):
            out.update({f"{prefix}{k.removesuffix('_per_dim')}_d{i}": x for i, x in enumerate(v)})
        elif isinstance(v, int | float):
            out[prefix + k] = v
    return out


@dataclass
class Trajectory:
    """One episode replayed chunk by chunk: predicted and demonstrated actions, (L, Da) each."""

    episode: int
    predicted: np.ndarray
    demonstrated: np.ndarray
    starts: list[int]  # the step where each chunk's executed actions begin

    def mse_per_dim(self) -> list[float]:
        return ((self.predicted - self.demonstrated) ** 2).mean(0).tolist()


def held_out_episodes(ds) -> list[int]:
    """The store's indices of the episodes `ds` holds, in order."""
    return np.flatnonzero(ds.episode_mask).tolist()


def only_episodes(ds, episodes: list[int]):
    """A view of `ds` over the given store episodes only."""
    mask = np.zeros(len(ds.episode_ends), dtype=bool)
    mask[episodes] = True
    return ds.view(mask)


@torch.no_grad()
def replay_episode(policy, ds, episode: int, seed: int, device: str) -> Trajectory:
    """Predict a chunk from the demonstration's observations every Ta steps and lay the executed
    chunks end to end, against the demonstrated actions of the same steps. The last chunk, where
    fewer than Ta steps are left, is planned at the episode's last window and its tail kept."""
    policy.eval()
    view = only_episodes(ds, [episode])
    ends = np.asarray(ds.episode_ends)
    ta = policy.executed_slice().stop - policy.executed_slice().start
    n = len(view)  # window i executes the episode's steps [i, i + Ta)
    end = min(int(ends[episode] - (ends[episode - 1] if episode > 0 else 0)), n - 1 + ta)
    plans = list(range(0, n, ta))
    if plans[-1] + ta < end:
        plans.append(n - 1)
    batch = to_device(view.get_batch(torch.tensor(plans, device=view.device)), device)
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + episode)
    pred = policy.predict_action_chunk(batch["obs"], generator=g)["action"].double().cpu().numpy()
    demo = batch["action"][:, policy.executed_slice()].double().cpu().numpy()
    starts = [max(p, q + ta) for p, q in zip(plans, [-ta, *plans])]  # skip steps already laid
    keep = [slice(s - p, min(p + ta, end) - p) for p, s in zip(plans, starts)]
    lay = lambda x: np.concatenate([x[k, sl] for k, sl in enumerate(keep)])  # noqa: E731
    return Trajectory(episode, lay(pred), lay(demo), starts)


def plot_trajectories(trajectories: list[Trajectory], out: Path, title: str, hz: float) -> Path:
    """A grid: one row per episode, one column per action dimension (the first PLOT_DIMS)."""
    from matplotlib.figure import Figure

    fig = _draw(Figure, trajectories, title, hz)
    fig.savefig(out, dpi=90)
    return out


def _draw(figure: type[Figure], trajectories: list[Trajectory], title: str, hz: float) -> Figure:
    dims = min(PLOT_DIMS, trajectories[0].predicted.shape[1])
    rows = len(trajectories)
    fig = figure(figsize=(3.4 * dims + 0.8, 2.3 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, dims, squeeze=False, sharex="row")
    for r, tr in enumerate(trajectories):
        t = np.arange(len(tr.predicted)) / hz
        mse = tr.mse_per_dim()
        for d in range(dims):
            ax = axes[r, d]
            for start in tr.starts:
                ax.axvline(start / hz, color="0.8", lw=0.6, zorder=0)
            ax.plot(t, tr.demonstrated[:, d], color="black", lw=1.6, label="demonstrated")
            ax.plot(t, tr.predicted[:, d], color="tab:orange", lw=1.2, label=PREDICTED)
            ax.set_title(f"action[{d}]  mse {mse[d]:.3g}", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.25)
            if d == 0:
                ax.set_ylabel(f"episode {tr.episode}", fontsize=10)
            if r == rows - 1:
                ax.set_xlabel("time (s)", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def evaluate_offline(
    policy, ds, *, batch_size: int, seed: int, device: str, out: Path, title: str, hz: float,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`dp eval` without a simulator: offline_metrics on `ds`, its first PLOT_EPISODES episodes
    replayed and plotted (out/trajectories.png), all recorded in out/metrics.json."""
    started = time.time()
    metrics = offline_metrics(policy, ds, batch_size, seed, device)
    episodes = held_out_episodes(ds)
    replayable = [e for e in episodes if len(only_episodes(ds, [e]))][:PLOT_EPISODES]
    shown = [replay_episode(policy, ds, e, seed, device) for e in replayable]
    plot = plot_trajectories(shown, out / "trajectories.png", title, hz)
    metrics.update(
        episodes=episodes,
        replayed=[{"episode": t.episode, "steps": len(t.predicted), "mse_per_dim": t.mse_per_dim()} for t in shown],
        plot=plot.name, wall_time_s=round(time.time() - started, 2), **(info or {}),
    )  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
