"""Execution strategies on hand-made numpy futures: where each switches, blends and what it asks the
planner for; the controlled-delay tick loop; seam metrics; bad delays (issue 14 items 1-3)."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_policy.chunking import ChunkExecutor, RealtimeController
from diffusion_policy.execution import (
    BID,
    RTC,
    Async,
    DelayedExecution,
    Ensemble,
    ExecutionError,
    PlanRequest,
    Smoothness,
    Sync,
    check_delay,
    make_strategy,
)

B, F, DA = 3, 15, 2


class FakePlanner:
    """Plan p's future: x = 100 * p + index, y = row; records every request it was asked."""

    def __init__(self, length: int = F):
        self.length = length
        self.requests: list[PlanRequest] = []

    def __call__(self, request: PlanRequest) -> np.ndarray:
        p = len(self.requests)
        self.requests.append(request)
        x = 100.0 * p + np.arange(self.length)
        out = np.zeros((B, self.length, DA), np.float32)
        out[:, :, 0] = x
        out[:, :, 1] = np.arange(B)[:, None]
        return out


def run(strategy, delay: int, ta: int, ticks: int) -> tuple[list[float | None], FakePlanner]:
    """x of row 0's action at each tick (None: hold)."""
    planner, driver = FakePlanner(), DelayedExecution(strategy, delay, ta)
    xs = []
    for _ in range(ticks):
        a, _ = driver.step(planner)
        xs.append(None if a is None else float(a[0, 0]))
        if a is not None:
            np.testing.assert_array_equal(a[:, 1], np.arange(B))  # rows stay rows
    return xs, planner


def test_zero_delay_sync_and_async_execute_ta_of_each_plan_from_index_0():
    for strategy in (Sync(execute=4), Async()):
        xs, planner = run(strategy, delay=0, ta=4, ticks=12)
        assert xs == [0, 1, 2, 3, 100, 101, 102, 103, 200, 201, 202, 203]
        assert all(r.kwargs() == {} for r in planner.requests)


def test_async_switches_to_the_new_plan_at_index_d():
    xs, _ = run(Async(), delay=2, ta=4, ticks=14)
    # plan 0 runs ticks 0..5 (it must cover the delay); plan 1, asked at tick 4, arrives at 6: index 2
    assert xs == [0, 1, 2, 3, 4, 5, 102, 103, 104, 105, 202, 203, 204, 205]


def test_async_with_a_delay_longer_than_ta_keeps_two_plans_in_flight():
    xs, _ = run(Async(), delay=3, ta=2, ticks=9)
    assert xs == [0, 1, 2, 3, 4, 103, 104, 203, 204]


def test_sync_holds_for_the_delay_then_runs_the_new_plan_from_index_0():
    xs, planner = run(Sync(execute=4), delay=2, ta=4, ticks=16)
    assert xs == [0, 1, 2, 3, None, None, 100, 101, 102, 103, None, None, 200, 201, 202, 203]
    assert len(planner.requests) == 3


def test_ensemble_blends_overlapping_plans_with_exp_weights():
    m = 0.5
    xs, _ = run(Ensemble(m), delay=1, ta=4, ticks=6)
    w = np.exp(-m * np.arange(2))
    # tick 5: plan 0's index 5 and plan 1's (asked at 4) index 1
    assert xs[:5] == [0, 1, 2, 3, 4]
    assert xs[5] == pytest.approx((w @ [5, 101]) / w.sum(), rel=1e-6)


@pytest.mark.parametrize("strategy", [RTC(), BID(n_samples=5)])
def test_rtc_and_bid_send_the_executing_prefix_and_the_delay(strategy):
    _, planner = run(strategy, delay=3, ta=4, ticks=9)
    first, second, third = planner.requests
    assert first.kwargs() == {}  # nothing executes yet: the first plan is a plain one
    kw = second.kwargs()  # asked at tick 4: plan 0's indices 4..14 are what the robot will do
    assert kw["prefix"].shape == (B, F - 4, DA) and kw["delay"] == 3
    assert kw["guidance"] == strategy.name and kw["n_samples"] == strategy.n_samples
    np.testing.assert_array_equal(kw["prefix"][0, :, 0], np.arange(4, F))
    # asked at tick 8: plan 1 (asked at 4, executing since tick 7) for ticks 8.., its indices 4..
    np.testing.assert_array_equal(third.kwargs()["prefix"][0, :, 0], 100 + np.arange(4, F))


def test_a_planner_whose_future_cannot_cover_the_delay_is_refused():
    driver = DelayedExecution(Async(), delay=2, n_action_steps=4)
    with pytest.raises(ExecutionError, match="5 future actions; delay 2 \\+ n_action_steps 4"):
        driver.step(FakePlanner(length=5))


def test_a_legacy_chunk_sets_n_action_steps():
    driver = DelayedExecution(Sync(), delay=0, n_action_steps=None)
    driver.step(FakePlanner(length=6))
    assert driver.n_action_steps == 6


def test_seam_and_inside_jumps_on_a_hand_made_sequence():
    meter = Smoothness()
    # one env row; plan 0: x = 0, 1, 2; plan 1: 10, 11; a hold between; plan 2: 11.5
    for x, plan in [(0, 0), (1, 0), (2, 0), (10, 1), (11, 1), (11.5, 2)]:
        meter.record(np.array([x, 0.0]), plan)
    meter.add_dropped(2, live=np.array([True, False, True]))
    s = meter.summary()
    assert s["n_seam"] == 2 and s["seam_jump_mean"] == pytest.approx((8 + 0.5) / 2)
    assert s["n_inside"] == 3 and s["inside_jump_mean"] == pytest.approx(1.0)
    assert s["seam_jump_p95"] == pytest.approx(np.percentile([8, 0.5], 95))
    assert s["dropped_actions"] == 4


def test_seams_are_per_row_and_only_while_live():
    meter = Smoothness()
    a = np.zeros((2, 2))
    meter.record(a, 0)
    meter.record(a + [[1, 0], [3, 0]], 0, live=np.array([True, False]))  # row 1 ended
    meter.record(a + [[4, 0], [9, 0]], 1, live=np.array([True, False]))
    s = meter.summary()
    assert (s["n_inside"], s["inside_jump_mean"]) == (1, 1.0)
    assert (s["n_seam"], s["seam_jump_mean"]) == (1, 3.0)
    meter.start()  # a new episode: no seam against the last one
    meter.record(a + 50, 2)
    assert meter.summary()["n_seam"] == 1


@pytest.mark.parametrize(
    "delay, ta, says",
    [
        (14, 1, "--delay 14: must be below horizon - n_obs_steps = 16 - 2 = 14"),
        (8, 8, "delay + n_action_steps must be at most 15"),
        (-1, 8, "--delay -1"),
        (0, 0, "--n-action-steps 0"),
    ],
)
def test_bad_delay_or_ta_is_one_clear_error(delay, ta, says):
    with pytest.raises(ExecutionError, match=says.replace("+", "\\+")):
        check_delay(delay, ta, horizon=16, n_obs_steps=2)
    check_delay(7, 8, horizon=16, n_obs_steps=2)  # the largest delay at Ta = 8


def test_zero_delay_is_always_possible_even_where_horizon_equals_n_obs_steps():
    """IBC's chunk is one action (horizon = To = 2): d = 0 must pass, d = 1 is refused."""
    from diffusion_policy.policies.guidance import PlanLimits, check_plan_fields

    check_delay(0, 1, horizon=2, n_obs_steps=2)
    check_plan_fields(PlanLimits(2, 2, 2, ("none", "bid")), 1, None, 0, "none", 1)
    with pytest.raises(ExecutionError, match="--delay 1"):
        check_delay(1, 1, horizon=2, n_obs_steps=2)


def test_unknown_strategy():
    with pytest.raises(ExecutionError, match="strategy 'fast'"):
        make_strategy("fast")


# --- one robot on the wall clock: the same strategies through ChunkExecutor ----------------------


def test_sync_executor_runs_a_late_chunk_from_its_first_action():
    ex = ChunkExecutor(2, 0.1, strategy=Sync())
    ex.reset({"x": np.zeros(1)}, t=0.0)
    chunk = np.arange(8, dtype=float)[:, None] * [1.0, 0.0]
    assert ex.add_chunk(chunk, obs_time=0.0, now=0.3) == 8 and ex.n_dropped == 0
    assert ex.action_at(0.2) is None and ex.action_at(0.3)[0] == 0  # index 0 at the arrival tick
    assert [ex.action_at(k * 0.1)[0] for k in range(4, 11)] == [1, 2, 3, 4, 5, 6, 7]


def test_realtime_controller_sends_the_prefix_for_rtc():
    seen = []

    def plan(obs, **request):
        seen.append(request)
        return np.arange(8, dtype=float)[:, None] * [1.0, 0.0] + 10 * len(seen)

    clock = [0.0]
    ctrl = RealtimeController(plan, 2, 0.1, strategy=RTC(), clock=lambda: clock[0])
    t0 = ctrl.reset({"x": np.zeros(1)})
    for i in range(1, 8):
        clock[0] = t0 + i * 0.1
        ctrl.step({"x": np.zeros(1)}, t0 + i * 0.1)
        if ctrl._inflight is not None:
            ctrl._inflight[0].result(5)
            break
    ctrl.close()
    assert seen[0] == {}  # the first plan: nothing executing
    # replans at tick 7 (one action left): the prefix is chunk 0's action for tick 7, delay 1
    assert seen[1]["guidance"] == "rtc" and seen[1]["delay"] == 1
    np.testing.assert_array_equal(seen[1]["prefix"], [[17.0, 10.0]])
