"""The chunk executor and real-time controller on a virtual clock (no sleeping, no torch)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from diffusion_policy.chunking import ChunkExecutor, ObsHistory, RealtimeController

DT = 0.1


def chunk(start: float, n: int = 8) -> np.ndarray:
    """Actions whose x value names the tick they were planned for: (n, 2)."""
    return np.stack([np.array([start + k, -1.0], dtype=np.float32) for k in range(n)])


def obs(v: float) -> dict[str, np.ndarray]:
    return {"x": np.array([v], dtype=np.float32)}


def test_actions_are_timestamped_from_the_observation_and_stale_ones_dropped() -> None:
    ex = ChunkExecutor(2, DT)
    ex.reset(obs(0), t=10.0)
    # Planned from the obs at tick 2 (t=10.2); the reply arrives at t=10.43, during tick 4.
    kept = ex.add_chunk(chunk(2), obs_time=10.2, now=10.43)
    assert kept == 5 and ex.n_dropped == 3  # ticks 2, 3, 4 are past (4 at 10.4 < 10.43)
    assert ex.action_at(10.4) is None
    assert ex.remaining(10.5) == 5
    got = [ex.action_at(10.0 + k * DT)[0] for k in range(5, 10)]
    assert got == [5, 6, 7, 8, 9]  # each action at its own tick, none shifted by the latency
    assert ex.action_at(11.0) is None and ex.remaining(11.0) == 0


def test_drop_margin_drops_actions_due_too_soon() -> None:
    ex = ChunkExecutor(2, DT, drop_margin_s=0.01)
    ex.reset(obs(0), t=0.0)
    assert ex.add_chunk(chunk(0), obs_time=0.0, now=0.295) == 4  # 0.3 < 0.295 + 0.01: dropped


def test_an_all_stale_chunk_still_schedules_its_last_action_at_the_next_tick() -> None:
    ex = ChunkExecutor(2, DT)
    ex.reset(obs(0), t=0.0)
    assert ex.add_chunk(chunk(0, n=4), obs_time=0.0, now=0.95) == 1
    assert ex.action_at(1.0)[0] == 3  # the last action, at tick 10


def test_a_new_chunk_supersedes_the_old_plan_from_its_first_tick() -> None:
    ex = ChunkExecutor(2, DT)
    ex.reset(obs(0), t=0.0)
    ex.add_chunk(chunk(0), obs_time=0.0, now=0.0)  # ticks 0..7, x = tick
    new = chunk(100)  # ticks 3..10 with x = 100 + k
    ex.add_chunk(new, obs_time=0.3, now=0.3)
    assert ex.n_superseded == 5  # ticks 3..7 of the old plan
    xs = [ex.action_at(k * DT)[0] for k in range(11)]
    assert xs == [0, 1, 2, 100, 101, 102, 103, 104, 105, 106, 107]


def test_temporal_ensembling_weights_older_predictions_by_exp_decay() -> None:
    m = 0.5
    ex = ChunkExecutor(2, DT, ensemble_decay=m)
    ex.reset(obs(0), t=0.0)
    a, b, c = chunk(0), chunk(10), chunk(20)
    ex.add_chunk(a, obs_time=0.0, now=0.0)  # ticks 0..7
    ex.add_chunk(b, obs_time=0.2, now=0.2)  # ticks 2..9
    ex.add_chunk(c, obs_time=0.4, now=0.4)  # ticks 4..11
    assert ex.n_superseded == 0
    assert ex.action_at(0.0)[0] == 0  # one prediction: itself
    w = np.exp(-m * np.arange(2))
    np.testing.assert_allclose(ex.action_at(0.3)[0], (w @ [3, 11]) / w.sum(), rtol=1e-6)
    w = np.exp(-m * np.arange(3))
    np.testing.assert_allclose(ex.action_at(0.5)[0], (w @ [5, 13, 21]) / w.sum(), rtol=1e-6)
    assert ex.action_at(0.5) is None  # popped
    # m = 0 is the plain mean; the y column (-1 everywhere) is unchanged by averaging.
    ex0 = ChunkExecutor(2, DT, ensemble_decay=0.0)
    ex0.reset(obs(0), t=0.0)
    ex0.add_chunk(a, 0.0, 0.0)
    ex0.add_chunk(b, 0.2, 0.2)
    np.testing.assert_allclose(ex0.action_at(0.6), [(6 + 14) / 2, -1.0])


def test_ensembling_smooths_a_chunk_boundary_jump() -> None:
    """Two plans that disagree by 10 at every tick: the replacement jumps, the ensemble moves half-way."""
    jump, smooth = ChunkExecutor(2, DT), ChunkExecutor(2, DT, ensemble_decay=0.0)
    for ex in (jump, smooth):
        ex.reset(obs(0), t=0.0)
        ex.add_chunk(np.zeros((8, 2)), 0.0, 0.0)
        ex.add_chunk(np.full((8, 2), 10.0), 0.4, 0.4)
    step_jump = [jump.action_at(k * DT)[0] for k in range(3, 6)]
    step_smooth = [smooth.action_at(k * DT)[0] for k in range(3, 6)]
    assert step_jump == [0, 10, 10] and step_smooth == [0, 5, 5]


def test_obs_history_and_executor_stack_the_newest_frames() -> None:
    ex = ChunkExecutor(3, DT)
    ex.reset(obs(1), t=0.0)
    np.testing.assert_array_equal(ex.policy_obs()["x"][:, 0], [1, 1, 1])  # edge-padded
    ex.observe(obs(2), 0.1)
    ex.observe(obs(3), 0.2)
    ex.observe(obs(4), 0.3)
    np.testing.assert_array_equal(ex.policy_obs()["x"][:, 0], [2, 3, 4])
    assert ex.obs_time == pytest.approx(0.3)
    h = ObsHistory(2, time_axis=1)
    h.reset({"x": np.zeros((4, 5))})
    assert h.stacked()["x"].shape == (4, 2, 5)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class GatedPlanner:
    """Plans x = tick of the newest obs + k; each reply waits until the test releases it."""

    def __init__(self, clock: FakeClock, latency: float):
        self.clock, self.latency = clock, latency
        self.seen: list[float] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, o: dict[str, np.ndarray]) -> np.ndarray:
        self.release.wait(5)
        newest = float(o["x"][-1, 0])
        self.seen.append(newest)
        self.clock.t += self.latency  # the time this plan took, on the virtual clock
        return chunk(newest)


def run_loop(ctrl: RealtimeController, clock: FakeClock, n: int) -> list[float | None]:
    """The robot side: tick i observes x = i and commands what the controller gives."""
    t0 = ctrl.reset(obs(0))
    out: list[float | None] = []
    for i in range(n):
        clock.t = t0 + i * DT + 0.001  # the loop wakes just after the tick
        a = ctrl.step(None if i == 0 else obs(i), t0 + i * DT)
        if ctrl._inflight is not None:
            ctrl._inflight[0].result(5)  # let the background plan finish before the next tick
            clock.t = t0 + i * DT + 0.001
        out.append(None if a is None else float(a[0]))
    ctrl.close()
    return out


def test_controller_replans_before_the_queue_runs_dry_and_never_holds() -> None:
    """With latency under one tick, every tick gets the action planned for it, no holds."""
    clock = FakeClock()
    planner = GatedPlanner(clock, latency=0.03)
    ctrl = RealtimeController(planner, 2, DT, clock=clock)
    out = run_loop(ctrl, clock, 30)
    assert None not in out
    assert out == list(range(30))  # action for tick i was planned for tick i
    # first chunk covers 0..7; replan at tick 7 (one action left) -> ticks 8..14, and so on
    assert planner.seen[:3] == [0, 7, 14]
    assert ctrl.executor.n_dropped >= 2  # each replan's own tick was past on arrival


def test_controller_plans_earlier_when_latency_exceeds_a_tick() -> None:
    clock = FakeClock()
    planner = GatedPlanner(clock, latency=0.25)  # 2.5 ticks
    ctrl = RealtimeController(planner, 2, DT, clock=clock)
    t0 = ctrl.reset(obs(0))
    first_plan_tick = None
    for i in range(1, 8):
        clock.t = t0 + i * DT
        ctrl.step(obs(i), t0 + i * DT)
        if ctrl._inflight is not None:
            first_plan_tick = i
            break
    # A 0.25 s reply needs 3 ticks: the replan starts when 3 actions (ticks 5, 6, 7) are left.
    assert first_plan_tick == 5 and ctrl.executor.remaining(t0 + 6 * DT) == 2
    ctrl.close()
    assert planner.seen == [0, 5]


def test_controller_holds_when_inference_is_slower_than_the_queue() -> None:
    clock = FakeClock()
    planner = GatedPlanner(clock, latency=0.0)
    ctrl = RealtimeController(planner, 2, DT, clock=clock)
    t0 = ctrl.reset(obs(0))
    planner.release.clear()  # the server stalls
    held = []
    for i in range(1, 12):
        clock.t = t0 + i * DT
        a = ctrl.step(obs(i), t0 + i * DT)
        held.append(a is None)
    assert held == [False] * 7 + [True] * 4  # chunk 0 covers ticks 0..7, then nothing
    planner.release.set()
    ctrl._inflight[0].result(5)
    clock.t = t0 + 12 * DT
    a = ctrl.step(obs(12), t0 + 12 * DT)
    assert a is not None and a[0] == 12  # planned at tick 7, stale ticks 7..11 dropped
    ctrl.close()


def test_controller_surfaces_a_failed_plan() -> None:
    calls = []

    def plan(o):
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("server gone")
        return chunk(0, n=2)

    clock = FakeClock()
    ctrl = RealtimeController(plan, 2, DT, clock=clock)
    t0 = ctrl.reset(obs(0))
    ctrl.step(None, t0)
    ctrl.step(obs(1), t0 + DT)  # one left: replans, the plan fails in the background
    ctrl._inflight[0].exception(5)
    with pytest.raises(ConnectionError, match="server gone"):
        ctrl.step(obs(2), t0 + 2 * DT)
    ctrl.close()


def test_executor_rejects_bad_dt() -> None:
    with pytest.raises(ValueError, match="dt"):
        ChunkExecutor(2, 0.0)
