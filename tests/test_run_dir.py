"""One run per run directory (issue 17, items 1, 2, 9 and 12), through the real `dp` CLI.

A fresh run never mixes into an old one; pruning deletes only the checkpoints it wrote; --resume
accepts a run's checkpoint directory, cleans killed writes and keeps metrics.jsonl consistent with
the resumed state; checkpoint files get the user's umask permissions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_policy.checkpoint import load_policy, save_checkpoint
from diffusion_policy.cli.main import main

pytestmark = pytest.mark.real_data

BASE = [
    "train.progress=false", "wandb.mode=disabled", "eval.n_videos=0", "train.final_eval=false",
    "train.eval_every=0", "train.num_threads=1",
]  # fmt: skip
LEGACY = Path(__file__).parent / "fixtures" / "legacy_7b92bc3" / "diffusion_keypoints"


def _train(pusht_zarr, run: Path, *extra: str) -> int:
    return main(["train", "smoke", f"task.dataset={pusht_zarr}", *BASE, f"run_dir={run}", *extra])


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "time/elapsed_s")} for r in rows]


def _latest_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "latest" / "train_state" / "raw_model.safetensors"))


@pytest.fixture(scope="module")
def six_steps(pusht_zarr, tmp_path_factory) -> Path:
    """A finished 6-step run, checkpointed every 2 steps, logging every step."""
    run = tmp_path_factory.mktemp("six") / "run"
    assert (
        _train(pusht_zarr, run, "train.max_steps=6", "train.log_every=1", "train.val_every=3") == 0
    )
    return run


def _killed_after_step_6(six_steps: Path, run: Path) -> Path:
    """The six-step run as a kill after step 6's log lines but before its checkpoint leaves it."""
    shutil.copytree(six_steps, run, symlinks=True)
    ckpts = run / "checkpoints"
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to("step_00000004")
    shutil.rmtree(ckpts / "step_00000006")
    return run


def test_fresh_run_into_a_used_run_dir_refuses_and_overwrite_starts_over(
    six_steps, pusht_zarr, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(six_steps, run, symlinks=True)
    (run / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _train(pusht_zarr, run, "train.max_steps=2") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # untouched

    assert _train(pusht_zarr, run, "train.max_steps=2", "--overwrite") == 0
    assert max(r["step"] for r in _rows(run)) == 2  # only the new run's lines
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    _, _, meta = load_policy(run)
    assert meta["step"] == 2
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files were deleted


def test_pruning_deletes_only_the_checkpoints_it_wrote(pusht_zarr, tmp_path):
    run = tmp_path / "run"
    assert _train(pusht_zarr, run, "train.max_steps=6", "train.stop_at_step=2") == 0
    c = run / "checkpoints"
    (c / "eval-mine").mkdir()  # a user's folder
    (c / "step_00000001").mkdir()  # named like a checkpoint, but holds none
    (c / "step_00000002" / "eval-x").mkdir()  # a dp eval result saved inside a checkpoint
    (c / "step_00000002" / "eval-x" / "metrics.json").write_text("{}")
    assert main(["train", "--resume", str(run), "train.stop_at_step=null"]) == 0
    names = sorted(p.name for p in c.iterdir())
    assert names == ["eval-mine", "latest", "step_00000001", "step_00000002", "step_00000004", "step_00000006"]  # fmt: skip
    # step_2's checkpoint files are gone (pruned), the evaluation saved in it is not
    assert sorted(p.name for p in (c / "step_00000002").iterdir()) == ["eval-x"]
    assert (c / "step_00000002" / "eval-x" / "metrics.json").read_text() == "{}"


def test_resume_from_a_checkpoint_dir_cleans_and_keeps_the_log_consistent(
    six_steps, tmp_path, capsys
):
    """A run killed after logging step 6 but with latest at step 4 (+ a killed write's temp dir),
    resumed by naming checkpoints/latest: the same weights and log as the uninterrupted run."""
    run = _killed_after_step_6(six_steps, tmp_path / "run")
    ckpts = run / "checkpoints"
    (ckpts / ".tmp-step_00000006-0badbeef" / "train_state").mkdir(parents=True)
    # a checkpoint that is not the latest is refused, naming the run
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000002")
    capsys.readouterr()
    assert main(["train", "--resume", str(ckpts / "step_00000002")]) == 2
    err = capsys.readouterr().err
    assert "not the latest checkpoint" in err and str(run) in err
    shutil.rmtree(ckpts / "step_00000002")

    assert main(["train", "--resume", str(ckpts / "latest")]) == 0
    assert not (ckpts / "step_00000004" / "checkpoints").exists()  # nothing nested
    assert not list(ckpts.glob(".tmp-*"))
    rows = _rows(run)
    assert rows == _rows(six_steps)  # no step twice, and the same values
    a, b = _latest_weights(six_steps), _latest_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_outside_a_run_is_refused_for_resume(tmp_path, capsys):
    ckpt = tmp_path / "copied"
    shutil.copytree(LEGACY, ckpt)
    assert main(["train", "--resume", str(ckpt)]) == 2
    assert "outside a run directory" in capsys.readouterr().err


def test_old_flat_config_run_resumes_bit_for_bit(six_steps, tmp_path):
    """A run directory written before the train.* sections (flat keys in every config.yaml)."""
    import yaml

    from diffusion_policy.config import LEGACY_TRAIN_KEYS

    run = _killed_after_step_6(six_steps, tmp_path / "run")
    ckpts = run / "checkpoints"
    for f in [run / "config.yaml", *ckpts.glob("step_*/config.yaml")]:
        doc = yaml.safe_load(f.read_text())
        t = doc["train"]
        for old, new in LEGACY_TRAIN_KEYS.items():
            section, key = new.split(".")
            t[old] = t[section].pop(key)
        for section in ("optim", "ema", "cadence"):
            assert not t.pop(section)
        f.write_text(yaml.safe_dump(doc))
    assert "lr:" in (ckpts / "step_00000004" / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "train.time_limit_min=30"]) == 0
    a, b = _latest_weights(six_steps), _latest_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(run) == _rows(six_steps)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_files_get_the_umask_permissions(tmp_path, umask, one_thread):
    policy, cfg, meta = load_policy(LEGACY)
    old = os.umask(umask)
    try:
        path = save_checkpoint(
            tmp_path / "c", cfg, policy.shape_meta, policy, meta=meta,
            train_state={"step": torch.tensor(1)}, raw_policy=policy,
        )  # fmt: skip
    finally:
        os.umask(old)
    files = [p for p in path.rglob("*") if p.is_file()]
    assert {p.relative_to(path).as_posix() for p in files} >= {
        "model.safetensors", "train_state/raw_model.safetensors", "train_state/state.pt"
    }  # fmt: skip
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
