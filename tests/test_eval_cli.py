"""`dp eval` end to end on a smoke run: where results go, the default sampling seed, bad options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from diffusion_policy.cli.main import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, pusht_zarr) -> Path:
    """A smoke run: 4 steps, checkpoints at 2 and 4, the training loop's evaluation at 4."""
    run = tmp_path_factory.mktemp("evalcli") / "run"
    assert main(["train", "smoke", f"task.dataset={pusht_zarr}", f"run_dir={run}"]) == 0
    return run


def _files(d: Path) -> set[Path]:
    return {p.relative_to(d) for p in d.rglob("*")}


@pytest.mark.real_data
def test_results_of_a_run_go_to_run_eval_where_pruning_never_reaches(run, capsys):
    """Issue 17 item 2: results went to checkpoints/step_N/eval-..., which pruning deletes."""
    before = _files(run / "checkpoints")
    assert main(["eval", str(run), "--videos", "1"]) == 0
    out = run / "eval" / "step_00000004-100000-2"
    assert _files(run / "checkpoints") == before
    assert (out / "metrics.json").is_file() and (out / "videos" / "seed_100000.mp4").is_file()
    assert f"wrote {out / 'metrics.json'}" in capsys.readouterr().out
    # a checkpoint named inside the run goes to the same place, under its own name
    assert main(["eval", str(run / "checkpoints" / "step_00000002"), "--episodes", "1"]) == 0
    assert (run / "eval" / "step_00000002-100000-1" / "metrics.json").is_file()
    assert _files(run / "checkpoints") == before


@pytest.mark.real_data
def test_results_of_a_bare_checkpoint_go_beside_it(run, tmp_path):
    bare = tmp_path / "policy"
    shutil.copytree((run / "checkpoints" / "latest").resolve(), bare)
    assert main(["eval", str(bare), "--episodes", "1", "--videos", "0"]) == 0
    assert (tmp_path / "policy-eval-100000-1" / "metrics.json").is_file()
    assert sorted(p.name for p in bare.iterdir()) == sorted(
        p.name for p in (run / "checkpoints" / "latest").iterdir()
    )


@pytest.mark.real_data
def test_dp_eval_scores_a_checkpoint_as_the_training_loop_did(run, tmp_path):
    """The training loop samples with train.seed; dp eval sampled with 0 (0.151 vs 0.025)."""
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    in_training = [x["eval/mean_score"] for x in logged if "eval/mean_score" in x][-1]
    assert main(["eval", str(run), "--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["mean_score"] == pytest.approx(in_training, abs=1e-6)  # float-level: backend order
    assert m["sampling_seed"] == 42 and m["mode"] == "in-process"  # the smoke run's train.seed
    # --seed overrides, and says so in metrics.json
    assert main(["eval", str(run), "--seed", "7", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["sampling_seed"] == 7


def _cuda_flag() -> str:
    import torch

    return "cuda:99" if torch.cuda.is_available() else "cuda"


@pytest.mark.real_data
@pytest.mark.parametrize(
    "argv, says",
    [
        (["--device", _cuda_flag()], "--device cuda"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--n-envs", "-2"], "--n-envs -2"),
        (["--max-steps", "0"], "--max-steps 0"),
        (["--max-steps", "-1"], "--max-steps -1"),
        (["--episodes", "0"], "--episodes 0"),
        (["--videos", "-1"], "--videos -1"),
        (["--out", "{run}/config.yaml/out"], "cannot write evaluation results"),
    ],
)
def test_bad_options_get_one_line_before_any_rollout(run, argv, says, capsys, monkeypatch):
    """Issue 17 item 7: these gave tracebacks, some after the rollouts had run."""
    import diffusion_policy.evaluation.rollout as rollout

    def no_rollout(*a, **k):
        raise AssertionError("a rollout ran before the options were checked")

    monkeypatch.setattr(rollout, "evaluate", no_rollout)
    argv = [a.format(run=run) for a in argv]
    assert main(["eval", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and "\n" not in err
