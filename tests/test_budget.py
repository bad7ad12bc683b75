"""The time-budgeted schedule (train.budget_min), on a fake clock: no wall-clock assertions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffusion_policy.checkpoint import read_checkpoint_meta
from diffusion_policy.config import TrainConfig, apply_resume_overrides, load_config
from diffusion_policy.errors import ConfigError
from diffusion_policy.training.budget import Budget, budget_lr_schedule, make_budget
from diffusion_policy.training.build import build_run
from diffusion_policy.training.loop import train


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_fraction_follows_the_clock_and_resume_continues_the_used_time():
    clock = FakeClock()
    b = Budget(10, 2, clock=clock)  # 8 minutes of training
    assert b.fraction() == 0 and not b.done()
    clock.t += 4 * 60
    assert b.fraction() == pytest.approx(0.5) and not b.done()
    clock.t += 4 * 60
    assert b.fraction() == 1 and b.done()
    b = Budget(10, 2, clock=clock)
    b.resume(2 * 60)  # a resumed run that had used 2 of its 8 minutes
    assert b.fraction() == pytest.approx(0.25)
    clock.t += 60
    assert b.fraction() == pytest.approx(3 / 8)
    capped = Budget(10, 2, max_steps=100, clock=clock)
    assert capped.progress(50) == pytest.approx(0.5)  # the step cap is further than the time


def test_the_lr_is_warmup_then_cosine_of_the_time_fraction():
    clock = FakeClock()
    cfg = TrainConfig(budget_min=10, budget_eval_min=0)
    cfg.optim.lr_warmup_steps = 2
    budget = make_budget(cfg, False, clock)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = budget_lr_schedule(opt, cfg, budget)
    assert sched.get_last_lr()[0] == 0.0  # warm-up starts at zero
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.5e-3)  # half-way up the warm-up, t = 0
    clock.t += 5 * 60
    for _ in range(3):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.5e-3)  # cos(pi/2) at half the budget
    clock.t += 2.5 * 60
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(0.75 * math.pi)))
    clock.t += 10 * 60
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0)  # the cosine has ended


def test_the_eval_reserve_and_bad_values():
    assert make_budget(TrainConfig(), True) is None  # a step-based run
    assert make_budget(TrainConfig(budget_min=50), True).eval_s == 5 * 60  # 10 % by default
    assert make_budget(TrainConfig(budget_min=50), False).eval_s == 0
    for bad in ({"budget_min": 0}, {"budget_min": 5, "budget_eval_min": 5}):
        with pytest.raises(ConfigError, match="budget"):
            TrainConfig(**bad)
    cfg = TrainConfig(budget_min=5)
    cfg.optim.lr_scheduler = "polynomial"
    with pytest.raises(ConfigError, match="cannot follow train.budget_min"):
        make_budget(cfg, True)


def _budgeted(pusht_zarr, run_dir, *extra):
    return load_config("smoke", [
        f"task.dataset={pusht_zarr}", f"run_dir={run_dir}", "train.progress=false",
        "wandb.mode=disabled", "eval.n_videos=0", "train.max_steps=null", "train.budget_min=1",
        "train.budget_eval_min=0.5", "train.cadence.eval_every=0", "train.cadence.checkpoint_every=1",
        "train.cadence.log_every=1", "train.cadence.val_every=0", *extra,
    ])  # fmt: skip


def _ticking_build(clock: FakeClock, seconds_per_step: float):
    """build_run whose every step takes `seconds_per_step` on `clock`."""

    def build(cfg, d, device):
        run = build_run(cfg, d, device)
        step = run.learner.step

        def timed(batch):
            clock.t += seconds_per_step
            return step(batch)

        run.learner.step = timed
        return run

    return build


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.real_data
def test_a_budgeted_run_stops_at_its_budget_and_still_evaluates(pusht_zarr, tmp_path, capsys):
    clock, run_dir = FakeClock(), tmp_path / "run"
    train(_budgeted(pusht_zarr, run_dir), build=_ticking_build(clock, 10.0), clock=clock)
    rows = _rows(run_dir)
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [1, 2, 3]  # 30 s of training at 10 s a step, then the 30 s eval reserve
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    assert lrs[-1] == pytest.approx(0.0)  # the cosine ended with the budget
    assert any("eval/mean_score" in r for r in rows)  # the final evaluation ran
    summary = next(r for r in rows if "budget/steps" in r)
    assert summary["budget/steps"] == 3 and summary["budget/minutes"] == 1
    assert summary["budget/it_s"] == pytest.approx(0.1)
    assert "3 steps" in capsys.readouterr().out.splitlines()[-1]
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["budget_used_s"] == pytest.approx(30.0)


@pytest.mark.real_data
def test_a_periodic_evaluation_that_uses_up_the_budget_is_the_final_one(pusht_zarr, tmp_path, monkeypatch):  # fmt: skip
    """Not a second evaluation of the same weights one step later (the 2-hour image run did that)."""
    import diffusion_policy.training.loop as loop

    clock, run_dir, evaluated = FakeClock(), tmp_path / "run", []
    real = loop.evaluation_metrics

    def slow_eval(run, run_dir, step):
        evaluated.append(step)
        clock.t += 15.0  # an evaluation longer than the training time left (30 - 20 s)
        return real(run, run_dir, step)

    monkeypatch.setattr(loop, "evaluation_metrics", slow_eval)
    cfg = _budgeted(pusht_zarr, run_dir, "train.cadence.eval_every=2", "train.cadence.checkpoint_every=0")  # fmt: skip
    train(cfg, build=_ticking_build(clock, 10.0), clock=clock)
    # at step 2 (20 s) the evaluation took the run past its 30 s of training
    assert evaluated == [2]
    assert [r["step"] for r in _rows(run_dir) if "train/loss" in r] == [1, 2]
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["budget_used_s"] == pytest.approx(35.0)
    # with time left after it, a periodic evaluation is not the last one
    clock, evaluated[:] = FakeClock(), []
    monkeypatch.setattr(
        loop, "evaluation_metrics", lambda r, d, s: evaluated.append(s) or real(r, d, s)
    )
    cfg = _budgeted(pusht_zarr, tmp_path / "run2", "train.cadence.eval_every=2", "train.cadence.checkpoint_every=0")  # fmt: skip
    train(cfg, build=_ticking_build(clock, 10.0), clock=clock)
    assert evaluated == [2, 3]  # periodic at 2, final at 3


@pytest.mark.real_data
def test_a_resumed_budgeted_run_continues_from_the_time_used(pusht_zarr, tmp_path):
    clock = FakeClock()
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_budgeted(pusht_zarr, straight, "train.cadence.final_eval=false"),
          build=_ticking_build(clock, 10.0), clock=clock)  # fmt: skip
    cfg = _budgeted(pusht_zarr, split, "train.cadence.final_eval=false", "train.stop_at_step=2")
    train(cfg, build=_ticking_build(clock, 10.0), clock=clock)
    clock.t += 10**6  # time between the sessions does not count
    _, saved, _ = read_checkpoint_meta(split)
    resumed = apply_resume_overrides(saved, ["train.stop_at_step=null"])
    train(resumed, resume=split, build=_ticking_build(clock, 10.0), clock=clock)
    steps = [r["step"] for r in _rows(split) if "train/loss" in r]
    assert steps == [1, 2, 3]  # one more step: 20 of its 30 s were used before
    a = torch.load(
        straight / "checkpoints" / "latest" / "train_state" / "state.pt", weights_only=True
    )
    b = torch.load(split / "checkpoints" / "latest" / "train_state" / "state.pt", weights_only=True)
    assert a["lr_scheduler"]["_last_lr"] == b["lr_scheduler"]["_last_lr"]
    for x, y in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(x["exp_avg"], y["exp_avg"])


@pytest.mark.real_data
def test_quickstart_minutes_sets_the_budget(pusht_zarr, monkeypatch):
    import diffusion_policy.training.loop as loop
    from diffusion_policy.cli.main import main

    seen = []
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: seen.append(cfg) or Path("/tmp/x"))
    assert main(["quickstart", "--data", str(pusht_zarr), "--preset", "pusht_diffusion_state_cpu", "--minutes", "12"]) == 0  # fmt: skip
    assert seen[0].train.budget_min == 12 and seen[0].train.budget_eval_min == 5
    assert main(["quickstart", "--data", str(pusht_zarr), "--preset", "pusht_diffusion_state_cpu"]) == 0  # fmt: skip
    assert seen[1].train.budget_min == 55 and seen[1].train.max_steps == 12000
