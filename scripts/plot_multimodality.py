"""Figure: demonstrations vs MSE regression vs Diffusion Policy vs Implicit BC on the bimodal toy task.

    .venv/bin/python scripts/plot_multimodality.py            # -> docs/figures/multimodality.png

Every panel is a (name, sampler) pair, sampler(n, generator) -> (n, T, 2) action chunks; a policy
panel is one entry in POLICIES below (a factory that builds a Policy for the task), trained by the
same `train_toy` loop.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffusion_policy.policies.base import Policy  # noqa: E402

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "tests")
)  # the toy task is a test fixture
from toy import (  # noqa: E402
    ActionSampler,
    BimodalTask,
    ToyTrainConfig,
    make_diffusion_policy,
    make_ibc_policy,
    make_mse_policy,
    policy_sampler,
    train_toy,
)

# (panel title, factory(task, seed) -> untrained Policy); panels appear in this order.
POLICIES: list[tuple[str, Callable[[BimodalTask, int], Policy]]] = [
    ("MSE regression (same U-Net)", make_mse_policy),
    ("Diffusion Policy (DDPM, 100 steps)", make_diffusion_policy),
    ("Implicit BC (Langevin)", make_ibc_policy),
]
COLORS = {"left": "tab:blue", "right": "tab:orange", "neither": "tab:red"}


def data_sampler(task: BimodalTask) -> ActionSampler:
    def sample(n: int, generator: torch.Generator) -> np.ndarray:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return task.sample(n, seed)["action"]

    return sample


def build_panels(
    task: BimodalTask, data: dict, train: ToyTrainConfig
) -> list[tuple[str, ActionSampler]]:
    panels = [("Demonstrations", data_sampler(task))]
    for name, make in POLICIES:
        policy = make(task, train.seed)
        losses = train_toy(policy, data, train)
        print(f"trained {name}: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-30:]):.3f}")
        panels.append((name, policy_sampler(policy)))
    return panels


def classify(task: BimodalTask, actions: np.ndarray) -> np.ndarray:
    """(N,) labels left | right | neither, with the same radius as mode_fractions."""
    d = task.mode_distances(actions)
    return np.where(
        d[:, 0] < task.mode_radius,
        "left",
        np.where(d[:, 1] < task.mode_radius, "right", "neither"),
    )


def plot(task: BimodalTask, samples: list[tuple[str, np.ndarray]], out: Path) -> None:
    fig, axes = plt.subplots(
        2,
        len(samples),
        figsize=(3.6 * len(samples), 6.2),
        height_ratios=[3, 1.4],
        squeeze=False,
        layout="constrained",
    )
    for col, (name, actions) in enumerate(samples):
        top, bottom = axes[0, col], axes[1, col]
        labels = classify(task, actions)
        top.add_patch(plt.Circle((0, 0), 0.45, color="0.85", zorder=0))
        top.text(0, 0, "obstacle", ha="center", va="center", fontsize=8, color="0.4")
        for i, path in enumerate(task.mode_paths()):
            top.plot(*path.T, color="k", lw=1, ls="--", zorder=3, label="mode paths" if i else None)
        for chunk, label in zip(actions, labels):
            top.plot(*chunk.T, color=COLORS[label], alpha=0.15, lw=1, marker=".", ms=2)
        fr = task.mode_fractions(actions)
        top.set_title(
            f"{name}\nleft {fr['left']:.0%}  right {fr['right']:.0%}  neither {fr['neither']:.0%}",
            fontsize=9,
        )
        top.set_xlim(-1.4, 1.4)
        top.set_ylim(-1.1, 1.1)
        top.set_aspect("equal")
        top.set_xlabel("action x")
        bottom.hist(task.side_score(actions), bins=np.linspace(-1.5, 1.5, 61), color="0.3")
        bottom.set_xlabel("side score (-1 left mode, +1 right mode)")
    axes[0, 0].set_ylabel("action y")
    axes[0, 0].legend(loc="lower center", fontsize=7, frameon=False)
    axes[1, 0].set_ylabel("chunks")
    fig.suptitle(
        f"Bimodal toy task: one observation, two equally likely action chunks (T={task.horizon}, 2-d)\n"
        f"{len(samples[0][1])} chunks per panel, coloured by the mode they lie within "
        f"RMS {task.mode_radius} of (red: neither)",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--steps", type=int, default=ToyTrainConfig.steps, help="training steps per model"
    )
    p.add_argument("--n-samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/figures/multimodality.png"))
    args = p.parse_args()

    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    task = BimodalTask()
    data = task.sample(1024, seed=args.seed)
    panels = build_panels(task, data, ToyTrainConfig(steps=args.steps, seed=args.seed))
    samples = [
        (name, s(args.n_samples, torch.Generator().manual_seed(args.seed))) for name, s in panels
    ]
    print("| panel | left | right | neither |\n|---|---|---|---|")
    for name, actions in samples:
        fr = task.mode_fractions(actions)
        print(f"| {name} | {fr['left']:.1%} | {fr['right']:.1%} | {fr['neither']:.1%} |")
    plot(task, samples, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
