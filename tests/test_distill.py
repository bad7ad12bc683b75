"""`dp distill`: the student's few-step chunk moves towards the teacher's many-step chunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusion_policy.checkpoint import load_policy
from diffusion_policy.cli.main import main
from diffusion_policy.policies.diffusion_sampling import ddim_table
from diffusion_policy.training.distill import distill, student_chunk

BASE = ["train.progress=false", "wandb.mode=disabled", "eval.n_videos=0", "train.final_eval=false"]


@pytest.fixture(scope="module")
def teacher(pusht_zarr, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "r"
    args = [f"task.dataset={pusht_zarr}", *BASE, "train.max_steps=30", "train.eval_every=0", f"run_dir={run}"]  # fmt: skip
    assert main(["train", "smoke", *args]) == 0
    return run / "checkpoints" / "latest"


def test_distilled_student_learns_the_teacher_map_and_loads_as_a_checkpoint(
    teacher, tmp_path, one_thread
):
    ckpt = distill(teacher, tmp_path / "s", steps=1, teacher_steps=8, train_steps=80,
                   batch_size=32, lr=1e-3, pool_size=256, log_every=10)  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    policy, cfg, meta = load_policy(ckpt)
    noise_cfg = cfg.policy.noise
    assert (noise_cfg.sampler, noise_cfg.num_inference_steps, noise_cfg.timestep_spacing) == ("ddim", 1, "trailing")  # fmt: skip
    assert noise_cfg.prediction_type == "sample" and meta["teacher_sampler"] == "ddim-8-trailing"
    # the saved student reproduces, through the ordinary sampling path, what distillation trained
    g = torch.Generator().manual_seed(1)
    obs = {"keypoints": torch.rand(4, 2, 20, generator=g) * 300 + 100}
    noise = torch.randn(4, 16, 2, generator=g)
    with torch.no_grad():
        direct = student_chunk(policy, ddim_table(policy.sampler, 1), obs, noise)
    out = policy.predict_action_chunk(obs, noise=noise)
    torch.testing.assert_close(policy.normalizer.normalize("action", out["action_pred"]), direct, rtol=0, atol=1e-4)  # fmt: skip
    assert out["action"].shape == (4, 8, 2)


def test_distill_cli_errors(teacher, tmp_path, capsys):
    assert main(["distill", str(teacher), "--out", str(tmp_path / "x"), "--steps", "8", "--teacher-steps", "8"]) == 2  # fmt: skip
    assert "fewer than --teacher-steps" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "nope" in capsys.readouterr().err


def test_distill_never_mixes_runs(teacher, tmp_path, capsys):
    """Issue 17 item 1 for dp distill: an --out that holds a run is refused unless --overwrite,
    and `dp train --resume` does not take a distillation run for an ordinary one."""
    out = tmp_path / "student"
    args = ["distill", str(teacher), "--out", str(out), "--train-steps", "2", "--pool", "32",
            "--batch-size", "8", "--teacher-steps", "2"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert main([*args, "--overwrite"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]  # the new run's line only
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    assert "dp distill" in capsys.readouterr().err
