"""The training loop through the real CLI: train -> resume (bit-for-bit) -> eval, checkpoints, DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_policy.cli.main import main
from diffusion_policy.errors import CheckpointError

pytestmark = pytest.mark.real_data

BASE = ["train.progress=false", "wandb.mode=disabled", "eval.n_videos=0", "train.final_eval=false"]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "train_state" / "raw_model.safetensors"))


def test_train_resume_is_bit_for_bit_and_eval_runs(pusht_zarr, tmp_path, capsys):
    common = [
        "smoke",
        f"task.dataset={pusht_zarr}",
        *BASE,
        "train.max_steps=6",
        "train.eval_every=0",
        "train.val_every=3",
        "train.num_threads=1",  # bit-for-bit needs a fixed count: 1 and 2 threads round differently
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *common, f"run_dir={straight}"]) == 0
    # the same run, stopped at step 3 and resumed
    assert main(["train", *common, f"run_dir={split}", "train.stop_at_step=3"]) == 0
    assert json.loads((split / "checkpoints" / "latest" / "meta.json").read_text())["step"] == 3
    assert main(["train", "--resume", str(split), "train.stop_at_step=null"]) == 0
    a, b = _weights(straight / "checkpoints" / "latest"), _weights(split / "checkpoints" / "latest")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a = load_file(str(straight / "checkpoints" / "latest" / "model.safetensors"))
    ema_b = load_file(str(split / "checkpoints" / "latest" / "model.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)

    # run directory layout
    assert (straight / "config.yaml").exists()
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in lines) and any("val/loss" in x for x in lines)
    assert all(x["sys/threads"] == 1 for x in lines if "train/loss" in x)
    assert (straight / "checkpoints" / "latest").is_symlink()

    # eval from the checkpoint alone, through the CLI
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                str(straight),
                "--episodes",
                "2",
                "--max-steps",
                "10",
                "--sync",
                "--videos",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_episodes"] == 2 and set(m["per_seed"]) == {"100000", "100001"}
    assert 0.0 <= m["mean_score"] <= 1.0 and len(m["mean_score_ci95"]) == 2
    assert (out / "videos" / "seed_100000.mp4").stat().st_size > 0
    assert "mean_score" in capsys.readouterr().out


@pytest.fixture(scope="module")
def two_step_run(pusht_zarr, tmp_path_factory) -> Path:
    """One tiny finished run, shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("two_step") / "r"
    args = [
        f"task.dataset={pusht_zarr}",
        *BASE,
        "train.max_steps=2",
        "train.eval_every=0",
        f"run_dir={run}",
    ]
    assert main(["train", "smoke", *args]) == 0
    return run


def test_resume_refuses_schedule_changes(two_step_run, capsys):
    run = two_step_run
    assert main(["train", "--resume", str(run), "train.lr=0.1"]) == 2
    assert "cannot override ['train.lr']" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "smoke", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert main(["train", "smoke", f"task.dataset={tmp_path / 'missing.zarr'}"]) == 2
    err = capsys.readouterr().err
    assert "missing.zarr" in err and "dp data fetch pusht" in err
    # a declared task with a scripted demonstrator names the command that makes its store
    assert main(["train", "blockpush_smoke", f"task.dataset={tmp_path / 'bp.zarr'}"]) == 2
    assert f"`dp data generate blockpush --episodes 1000 --out {tmp_path / 'bp.zarr'}`" in capsys.readouterr().err  # fmt: skip
    assert main(["train", "blockpush_smoke", "task.name=my_robot", f"task.dataset={tmp_path / 'r.zarr'}"]) == 2  # fmt: skip
    assert "set task.dataset to your replay-buffer store" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no_such_ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_interrupted_checkpoint_write_keeps_latest(two_step_run, tmp_path, monkeypatch):
    from diffusion_policy import checkpoint as ck

    run = two_step_run
    latest = (run / "checkpoints" / "latest").resolve()
    policy, cfg, meta = ck.load_policy(run)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        ck.save_checkpoint(latest, cfg, policy.shape_meta, policy, meta=meta)
    monkeypatch.undo()
    again, _, meta2 = ck.load_policy(run)  # the previous checkpoint is intact
    assert meta2 == meta
    assert not list((run / "checkpoints").glob(".tmp-*"))
    with pytest.raises(CheckpointError, match="config.yaml is missing"):
        ck.load_policy(tmp_path)  # a directory without a checkpoint in it is named


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        # what safetensors and torch.save raise on a full disk: no errno, so free space decides
        (
            RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0"),
            "no space left on device",
        ),  # fmt: skip
        (PermissionError(13, "Permission denied"), "Permission denied"),
    ],
    ids=["disk_full", "permission"],
)
def test_failed_checkpoint_write_is_one_line_and_keeps_latest(
    pusht_zarr, tmp_path, monkeypatch, capsys, error, reason
):
    """Issue 17 item 7: a checkpoint write that fails mid-run (the second one here) ends the run
    with one line naming the path and the reason; latest still points at the first, intact."""
    from types import SimpleNamespace

    from diffusion_policy import checkpoint as ck

    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: SimpleNamespace(free=0))
    run = tmp_path / "run"
    args = ["smoke", f"task.dataset={pusht_zarr}", *BASE, "train.eval_every=0", f"run_dir={run}"]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cannot write checkpoint" in err and "step_00000004" in err and reason in err
    monkeypatch.undo()
    _, _, meta = ck.load_policy(run)
    assert meta["step"] == 2
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_config_and_run_dir_errors_come_before_training(pusht_zarr, tmp_path, capsys):
    """Bad eval.* values, an unknown device and an unwritable run_dir: one line, nothing written."""
    common = ["train", "smoke", f"task.dataset={pusht_zarr}", *BASE]
    for bad in ("eval.max_steps=0", "eval.n_envs=-2", "train.device=tpu", "train.lr=-1"):
        assert main([*common, bad, f"run_dir={tmp_path / 'r'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and bad.split("=")[0].split(".")[-1] in err
    assert not (tmp_path / "r").exists()
    (tmp_path / "file").write_text("")
    assert main([*common, f"run_dir={tmp_path / 'file' / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write there" in err


def test_preset_name_beside_a_same_named_directory_trains(pusht_zarr, tmp_path, monkeypatch):
    """Issue 17 item 8, the README's case: run_dir=smoke made ./smoke; `dp train smoke` again."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "smoke", f"task.dataset={pusht_zarr}", *BASE, "train.max_steps=1", "train.eval_every=0", "run_dir=smoke"]) == 0  # fmt: skip
    assert (tmp_path / "smoke" / "config.yaml").exists()
    assert main(["train", "smoke", f"task.dataset={pusht_zarr}", *BASE, "train.max_steps=1", "train.eval_every=0", "run_dir=other"]) == 0  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_match_one_rank_with_double_batch(pusht_zarr, tmp_path):
    """One step of 2 gloo ranks x batch B equals one step of 1 rank x batch 2B."""
    common = [
        "smoke",
        f"task.dataset={pusht_zarr}",
        *BASE,
        "train.max_steps=1",
        "train.eval_every=0",
        "train.val_every=0",
        "train.device=cpu",
    ]
    one = tmp_path / "one"
    assert main(["train", *common, "train.batch_size=16", f"run_dir={one}"]) == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
        "--master_addr=127.0.0.1", "-m", "diffusion_policy.cli.main", "train", *common, "train.batch_size=8", f"run_dir={two}",
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a, b = _weights(one / "checkpoints" / "latest"), _weights(two / "checkpoints" / "latest")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_every_step_adapts_the_threads(pusht_zarr, tmp_path, monkeypatch):
    """The loop asks the thread guard before each step (threads.py), so a competitor that starts
    mid-run takes a thread away within seconds."""
    import diffusion_policy.training.loop as loop

    calls = []
    monkeypatch.setattr(loop, "adapt_threads", lambda: calls.append(1))
    args = [f"task.dataset={pusht_zarr}", *BASE, "train.max_steps=3", "train.eval_every=0"]
    assert main(["train", "smoke", *args, f"run_dir={tmp_path / 'r'}"]) == 0
    assert len(calls) == 3
