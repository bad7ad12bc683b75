"""Issue 13 item 6, training without a simulator: a task with task.env_id=null validates on held-out
episodes (loss, per-dimension action MSE), keeps the best checkpoints by the lowest MSE, never makes
an env, and `dp eval` of its checkpoints writes the same numbers to metrics.json with a plot."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from diffusion_policy.cli.main import main
from diffusion_policy.training.checkpointer import OFFLINE_MSE, ROLLOUT_SCORE, Checkpointer

# six steps, evaluated offline at 2, 4 and 6, the best two kept
ENVLESS = ["task.env_id=null", "train.max_steps=6", "train.cadence.eval_every=2"]
ENVLESS += ["train.cadence.keep_best=2", "train.optim.lr=3e-3"]


def _no_env(*a, **k):
    raise AssertionError("an env was made for a task without a simulator")


def _forbid_envs(mp: pytest.MonkeyPatch) -> None:
    import gymnasium

    import diffusion_policy.evaluation.rollout as rollout

    for mod, name in ((gymnasium, "make"), (rollout, "make_env"), (rollout, "evaluate")):
        mp.setattr(mod, name, _no_env)


@pytest.fixture(scope="module")
def run(tmp_path_factory, pusht_zarr) -> Path:
    run = tmp_path_factory.mktemp("offline") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _forbid_envs(mp)
        args = ["train", "smoke", f"task.dataset={pusht_zarr}", f"run_dir={run}", *ENVLESS]
        assert main(args) == 0
    return run


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _offline_evals(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _log(run) if "offline/action_mse_norm" in r}


@pytest.mark.real_data
def test_envless_training_logs_offline_metrics_and_keeps_the_lowest_mse(run):
    evals = _offline_evals(run)
    assert sorted(evals) == [2, 4, 6]
    assert not [r for r in _log(run) if any(k.startswith("eval/") for k in r)]
    last = evals[6]
    for key in ("loss", "action_mse", "action_mse_d0", "action_mse_d1", "horizon_mse_d1"):
        assert np.isfinite(last[f"offline/{key}"])
    assert last["offline/action_mse"] == pytest.approx(
        (last["offline/action_mse_d0"] + last["offline/action_mse_d1"]) / 2
    )
    best = sorted(evals, key=lambda s: evals[s]["offline/action_mse_norm"])[:2]
    assert len({evals[s]["offline/action_mse_norm"] for s in evals}) == 3  # a real ranking
    want = {OFFLINE_MSE.tag(s, evals[s]["offline/action_mse_norm"]) for s in best}
    kept = {p.name for p in (run / "checkpoints").glob("best_*")}
    assert kept == want
    meta = json.loads((run / "checkpoints" / sorted(want)[0] / "meta.json").read_text())
    assert "offline/action_mse_norm" in meta


def _fake_checkpointer(tmp_path: Path, by, monkeypatch) -> tuple[Checkpointer, set[str]]:
    import diffusion_policy.training.checkpointer as mod

    saved: set[str] = set()  # removing a copy never made is a no-op, as remove_checkpoint's
    monkeypatch.setattr(mod, "save_checkpoint", lambda path, *a, **k: saved.add(path.name))
    monkeypatch.setattr(mod, "remove_checkpoint", lambda path: saved.discard(path.name))
    run = SimpleNamespace(cfg=None, shape_meta=None, learner=SimpleNamespace(deployed=None))
    return Checkpointer(tmp_path, run, 2, True, by), saved  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "by, values, kept",
    [
        (ROLLOUT_SCORE, [0.5, 0.2, 0.9, 0.1], ["best_step00000001_score0.500", "best_step00000003_score0.900"]),
        (OFFLINE_MSE, [0.5, 0.2, 0.9, 0.1], ["best_step00000002_mse0.2", "best_step00000004_mse0.1"]),
        (OFFLINE_MSE, [0.5, float("nan"), 0.7], ["best_step00000001_mse0.5", "best_step00000003_mse0.7"]),
    ],
)  # fmt: skip
def test_keep_best_ranks_by_the_metric_in_its_direction(tmp_path, monkeypatch, by, values, kept):
    ckpt, saved = _fake_checkpointer(tmp_path, by, monkeypatch)
    for step, v in enumerate(values, start=1):
        ckpt.keep_best(step, {by.key: v})
    assert sorted(saved) == kept and sorted(t for _, _, t in ckpt.best) == kept


@pytest.mark.real_data
def test_dp_eval_scores_the_checkpoint_as_the_loop_did_and_plots(run, capsys, monkeypatch):
    _forbid_envs(monkeypatch)
    assert main(["eval", str(run)]) == 0
    out = run / "eval" / "step_00000006-offline"
    printed = capsys.readouterr().out
    assert f"wrote {out / 'metrics.json'} and {out / 'trajectories.png'}" in printed
    m = json.loads((out / "metrics.json").read_text())
    logged = _offline_evals(run)[6]
    for key in ("loss", "action_mse", "action_mse_norm", "horizon_mse", "horizon_mse_norm"):
        assert m[key] == pytest.approx(logged[f"offline/{key}"], rel=1e-6), key  # float32 order
    assert m["action_mse_per_dim"] == pytest.approx([logged["offline/action_mse_d0"], logged["offline/action_mse_d1"]])  # fmt: skip
    assert m["mode"] == "offline" and m["sampling_seed"] == 42
    assert m["episodes"] == [18, 90, 134, 157]  # the smoke split's held-out episodes
    assert [r["episode"] for r in m["replayed"]] == [18, 90, 134, 157]
    from matplotlib.image import imread

    img = imread(out / "trajectories.png")
    assert img.shape[0] > 500 and img.shape[1] > 500 and img.std() > 0.05
    # the same command again: the same numbers and the same picture
    first_png = (out / "trajectories.png").read_bytes()
    assert main(["eval", str(run)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    drop = lambda d: {k: v for k, v in d.items() if k != "wall_time_s"}  # noqa: E731
    assert drop(again) == drop(m)
    assert (out / "trajectories.png").read_bytes() == first_png


@pytest.mark.real_data
def test_replayed_episode_lines_up_with_the_demonstration(run, pusht_zarr):
    """The chunks laid end to end are compared with the episode's own actions, step for step."""
    from diffusion_policy.checkpoint import load_policy
    from diffusion_policy.data.replay_buffer import ReplayBuffer
    from diffusion_policy.evaluation.offline import replay_episode
    from diffusion_policy.training.build import load_datasets

    policy, cfg, _ = load_policy(run / "checkpoints" / "latest")
    _, val, _ = load_datasets(cfg, "cpu")
    demo = ReplayBuffer.load(pusht_zarr, keys=["action"]).get_episode(90)["action"]
    tr = replay_episode(policy, val, 90, seed=0, device="cpu")
    assert tr.demonstrated.shape == tr.predicted.shape == demo.shape
    np.testing.assert_allclose(tr.demonstrated, demo, rtol=0, atol=1e-4)
    # chunks of Ta = 8 from steps 0, 8, ..., 96; the last 5 steps from the plan at the last window
    assert tr.starts == [*range(0, 104, 8), 104] and len(demo) == 109
    assert not np.allclose(tr.predicted, tr.demonstrated)


@pytest.mark.real_data
def test_dp_eval_on_another_store_and_fewer_episodes(run, pusht_zarr, tmp_path):
    out = tmp_path / "other"
    argv = ["eval", str(run), "--dataset", str(pusht_zarr), "--episodes", "2", "--out", str(out)]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["episodes"] == [0, 1] and m["dataset"] == str(pusht_zarr)
    assert (out / "trajectories.png").is_file()


@pytest.mark.real_data
@pytest.mark.parametrize(
    "argv, says",
    [
        (["--realtime"], "--realtime applies to rollouts, but this checkpoint's task has no simulator"),
        (["--videos", "2"], "--videos applies to rollouts"),
        (["--seed-start", "0"], "--seed-start applies to rollouts"),
        (["--episodes", "9"], "--episodes 9: the run held out only 4 episodes"),
    ],
)  # fmt: skip
def test_dp_eval_bad_offline_options_are_one_line(run, argv, says, capsys):
    assert main(["eval", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and "\n" not in err


@pytest.mark.real_data
def test_envless_training_without_heldout_episodes_says_set_val_ratio(pusht_zarr, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "smoke", f"task.dataset={pusht_zarr}", f"run_dir={run}", *ENVLESS]
    assert main([*args, "data.val_ratio=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "task.env_id is null" in err and "set data.val_ratio" in err and "\n" not in err
    assert not run.exists()


@pytest.mark.real_data
def test_offline_flag_scores_a_checkpoint_whose_task_has_an_env(pusht_zarr, tmp_path, monkeypatch):
    """--offline on a Push-T checkpoint: the held-out episodes, no rollout."""
    run = tmp_path / "run"
    args = ["train", "smoke", f"task.dataset={pusht_zarr}", f"run_dir={run}", "train.max_steps=2"]
    assert main([*args, "train.cadence.final_eval=false"]) == 0
    _forbid_envs(monkeypatch)
    assert main(["eval", str(run), "--offline", "--episodes", "1"]) == 0
    m = json.loads((run / "eval" / "step_00000002-offline-1" / "metrics.json").read_text())
    assert m["episodes"] == [18] and np.isfinite(m["action_mse"])


@pytest.mark.real_data
def test_dp_report_draws_the_offline_validation(run, tmp_path):
    from diffusion_policy.evaluation.report import _summary
    from diffusion_policy.evaluation.run_log import OFFLINE, read_run

    log = read_run(run)
    assert log.series[OFFLINE][0].tolist() == [2, 4, 6] and not log.evals
    assert main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 10_000
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    _summary(ax, log, "s", 1.0)
    best = min(_offline_evals(run).values(), key=lambda r: r[OFFLINE])
    assert f"best {OFFLINE}: {best[OFFLINE]:.4g} at step {best['step']}" in ax.texts[0].get_text()
