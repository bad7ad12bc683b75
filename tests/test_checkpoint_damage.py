"""A damaged checkpoint is one clear line in `dp eval`, `dp serve`, `dp export` and `dp train --resume`, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from diffusion_policy.cli.main import main


@pytest.fixture(scope="module")
def run(pusht_zarr, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("damage") / "run"
    args = [f"task.dataset={pusht_zarr}", f"run_dir={out}", "train.max_steps=2", "train.cadence.eval_every=0", "train.cadence.final_eval=false", "train.cadence.val_every=0", "train.cadence.checkpoint_every=2"]  # fmt: skip
    assert main(["train", "smoke", *args]) == 0
    return out


def _damage(ckpt: Path, case: str) -> None:
    if case == "truncated weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif case == "no weights":
        (ckpt / "model.safetensors").unlink()
    elif case == "no meta.json":
        (ckpt / "meta.json").unlink()
    elif case == "garbage meta.json":
        (ckpt / "meta.json").write_text("{not json")
    elif case == "unparseable config.yaml":
        (ckpt / "config.yaml").write_text("train: [1, 2\n")
    elif case == "config of another policy":
        text = (
            (ckpt / "config.yaml")
            .read_text()
            .replace("    - 16\n    - 32\n", "    - 32\n    - 64\n")
        )
        assert text != (ckpt / "config.yaml").read_text()
        (ckpt / "config.yaml").write_text(text)
    else:
        raise AssertionError(case)


CASES = ["truncated weights", "no weights", "no meta.json", "garbage meta.json", "unparseable config.yaml", "config of another policy"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("verb", ["eval", "serve", "export"])
def test_damaged_checkpoint_is_one_line(run, tmp_path, case, verb, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree((run / "checkpoints" / "latest").resolve(), ckpt)
    _damage(ckpt, case)
    capsys.readouterr()
    argv = {
        "eval": ["eval", str(ckpt), "--episodes", "1", "--max-steps", "2", "--videos", "0"],
        "serve": ["serve", str(ckpt), "--port", "0", "--no-warmup"],
        "export": ["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "p.pt")],
    }[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]


def test_dangling_latest_is_one_line_for_eval_and_resume(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    target = (copy / "checkpoints" / "latest").resolve()
    shutil.rmtree(target)
    for argv in (["eval", str(copy), "--episodes", "1"], ["train", "--resume", str(copy)]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
