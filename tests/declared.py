"""Train the smoke preset on a declared task (issue 13 item 1's spec) for two steps, via `dp train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from diffusion_policy.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def train_two_steps(tmp_path: Path, task: dict[str, Any]) -> Path:
    """The run directory of a finished 2-step run of configs/smoke.yaml with `task` in place."""
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["task"] = task
    cfg["data"] = {"val_ratio": 0.25, "max_train_episodes": None}
    preset = tmp_path / "declared_smoke.yaml"
    preset.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    flags = ["train.progress=false", "wandb.mode=disabled", "train.cadence.final_eval=false"]
    # short robot episodes: horizon 8 with To 2 and Ta 4 needs episodes of 4 steps or more
    shape = ["policy.horizon=8", "policy.n_action_steps=4"]
    args = [*flags, *shape, "train.max_steps=2", "train.cadence.eval_every=0", "train.batch_size=4", f"run_dir={run}"]  # fmt: skip
    assert main(["train", str(preset), *args]) == 0
    assert json.loads((run / "checkpoints" / "latest" / "meta.json").read_text())["step"] == 2
    return run
