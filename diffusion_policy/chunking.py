"""Observation history and action-chunk execution: the one place that turns a chunk policy into a
per-step controller. Shared by simulated evaluation, the policy-server client and robot loops, so
it imports numpy only (no torch).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from diffusion_policy.execution import Async, Ensemble, Schedule, Strategy


def as_obs_dict(obs: np.ndarray | Mapping[str, np.ndarray], obs_key: str) -> dict[str, np.ndarray]:
    """Env observations -> {key: array}; array observations (state, keypoints) get `obs_key`."""
    if isinstance(obs, Mapping):
        return {k: np.asarray(v) for k, v in obs.items()}
    return {obs_key: np.asarray(obs)}


class ObsHistory:
    """The last `n_obs_steps` observations, stacked on axis `time_axis` (1 for batched envs, 0 for one).

    Right after a reset the first observation is repeated, matching the dataset's edge padding.
    """

    def __init__(self, n_obs_steps: int, time_axis: int = 1):
        self.n_obs_steps = n_obs_steps
        self.time_axis = time_axis
        self._frames: deque[dict[str, np.ndarray]] = deque(maxlen=n_obs_steps)

    def reset(self, obs: Mapping[str, np.ndarray]) -> None:
        self._frames.clear()
        self._frames.append(dict(obs))

    def push(self, obs: Mapping[str, np.ndarray]) -> None:
        if not self._frames:
            self.reset(obs)
            return
        self._frames.append(dict(obs))

    def stacked(self) -> dict[str, np.ndarray]:
        """{key: (B, To, ...)} (or (To, ...)); the oldest frame fills in until To exist."""
        if not self._frames:
            raise RuntimeError("ObsHistory is empty: call reset(obs) first")
        frames = [self._frames[0]] * (self.n_obs_steps - len(self._frames)) + list(self._frames)
        return {k: np.stack([f[k] for f in frames], axis=self.time_axis) for k in frames[-1]}

    def __len__(self) -> int:
        return len(self._frames)


_TIME_EPS = 1e-6  # s; an action due "now" stays due despite float rounding of obs_time + k * dt


class ChunkExecutor:
    """One robot's observation history and timestamped action queue (the original's real-robot loop).

    Action k of a chunk planned from the observation taken at `obs_time` is due at
    `obs_time + k * dt` (chunk[0] answers that observation, see policies/base.py). An action whose
    time is already past when the chunk arrives (`< now + drop_margin_s`) is dropped: that is what
    absorbs observation and inference latency. If the whole chunk is stale, its last action is
    scheduled at the next tick so the robot still moves toward the plan (spec §9).

    How overlapping chunks join is the `strategy`'s (execution.py): by default (async) the newest
    replaces every later-scheduled action; with `ensemble_decay = m` (the ensemble strategy) the
    predictions for one tick are averaged with weights exp(-m * i), i = 0 for the oldest
    (temporal ensembling as in ACT): m > 0 favours older plans (smoother), m < 0 newer ones (more
    reactive), 0 is a plain mean. This removes the jump at chunk boundaries. With sync, a chunk
    runs from its first action at the tick it arrives (the robot waited for it).

    Time is passed in, never read here, so tests and simulations can run on a virtual clock. Times
    are snapped to the tick grid that `reset(obs, t)` starts.
    """

    def __init__(
        self,
        n_obs_steps: int,
        dt: float,
        *,
        ensemble_decay: float | None = None,
        drop_margin_s: float = 0.0,
        time_axis: int = 0,
        strategy: Strategy | None = None,
    ):
        if dt <= 0:
            raise ValueError(f"dt={dt}: must be > 0")
        if strategy is None:
            strategy = Async() if ensemble_decay is None else Ensemble(ensemble_decay)
        self.dt = dt
        self.strategy = strategy
        self.drop_margin_s = drop_margin_s
        self.history = ObsHistory(n_obs_steps, time_axis=time_axis)
        self.schedule = Schedule()
        self._t0 = 0.0
        self.obs_time: float | None = None
        self.n_chunks = 0
        self.n_dropped = 0  # stale on arrival
        self.n_superseded = 0  # replaced by a newer chunk (no ensembling)
        self.last_plan_id = -1  # the newest plan in the last action given

    @property
    def ensemble_decay(self) -> float | None:
        return self.strategy.decay

    def tick(self, t: float) -> int:
        """Index of the control tick nearest time t."""
        return round((t - self._t0) / self.dt)

    def reset(self, obs: Mapping[str, np.ndarray], t: float) -> None:
        """Start an episode at time t (tick 0) with its first observation."""
        self._t0 = t
        self.schedule.clear()
        self.history.reset(obs)
        self.obs_time = t
        self.n_chunks = self.n_dropped = self.n_superseded = 0
        self.last_plan_id = -1

    def observe(self, obs: Mapping[str, np.ndarray], t: float) -> None:
        """Add the observation taken at time t (one per tick)."""
        self.history.push(obs)
        self.obs_time = t

    def policy_obs(self) -> dict[str, np.ndarray]:
        """{key: (To, ...)} for the policy (or (B, To, ...) with time_axis=1)."""
        return self.history.stacked()

    def add_chunk(self, actions: np.ndarray, obs_time: float, now: float) -> int:
        """Schedule actions (Ta, Da) planned from the observation at `obs_time`; returns how many were kept."""
        actions = np.asarray(actions)
        n, plan_id = len(actions), self.n_chunks
        self.n_chunks += 1
        if not n:
            return 0
        first = self.tick(obs_time)
        thresh = now + self.drop_margin_s - _TIME_EPS  # an action due before this is stale
        start = next((k for k in range(n) if obs_time + k * self.dt >= thresh), n)
        if start == n and self.strategy.waits:  # sync: its first action at the first tick due
            start = max(0, math.ceil((thresh - obs_time) / self.dt))
        if start < n or self.strategy.waits:
            merged = self.strategy.merge(self.schedule, plan_id, first, actions, start)
            kept = n - merged.dropped
        else:  # all stale: the last action at the next tick, toward the plan
            last = max(self.tick(now) + 1, first)
            merged = self.strategy.merge(self.schedule, plan_id, last - n + 1, actions, n - 1)
            kept = 1
        self.n_dropped += n - kept if start < n or self.strategy.waits else n
        self.n_superseded += merged.superseded
        return kept

    def remaining(self, t: float) -> int:
        """Actions scheduled at or after time t."""
        return self.schedule.remaining(self.tick(t))

    def action_at(self, t: float) -> np.ndarray | None:
        """The action due at time t (ensembled if enabled), or None if nothing is planned for it.

        Anything scheduled before t is discarded. None means the plan ran dry: a robot holds its
        last command.
        """
        due = self.strategy.action_at(self.schedule, self.tick(t))
        if due is None:
            return None
        self.last_plan_id = due[1]
        return due[0]


class RealtimeController:
    """The policy side of a fixed-rate control loop, for one robot:

        t0 = ctrl.reset(obs0)                         # plans the first chunk, waits for it
        for i in range(n): action = ctrl.step(obs_i if i else None, t0 + i * dt)  # None: hold

    `plan(obs {key: (To, ...)}, **request) -> actions (Ta, Da)` runs in a background thread (a
    remote call or an in-process policy), so the robot keeps executing queued actions while it
    runs. `request` is the strategy's (execution.PlanRequest.kwargs: empty but for rtc and bid,
    which send the executing prefix and the expected delay in ticks). A new plan is requested when
    the queue would run dry before an answer can arrive: when the actions left cover no more than
    the recent worst latency (at least one tick), or every `replan_every` ticks if set (the
    original replanned every 6 of 15); with the sync strategy only once the queue is empty (the
    robot waits). Replies are taken in at the next tick.
    """

    def __init__(
        self,
        plan: Callable[..., np.ndarray],
        n_obs_steps: int,
        dt: float,
        *,
        ensemble_decay: float | None = None,
        replan_every: int | None = None,
        drop_margin_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        strategy: Strategy | None = None,
    ):
        self.plan = plan
        self.executor = ChunkExecutor(
            n_obs_steps,
            dt,
            ensemble_decay=ensemble_decay,
            drop_margin_s=drop_margin_s,
            strategy=strategy,
        )
        self.dt = dt
        self.replan_every = replan_every
        self.clock = clock
        self.latencies: list[float] = []  # seconds from request to reply, per plan
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dp-plan")
        self._inflight: tuple[Future, float] | None = None  # (reply, obs_time)
        self._last_plan_tick = 0

    def _timed_plan(
        self, obs: dict[str, np.ndarray], request: dict[str, Any]
    ) -> tuple[np.ndarray, float]:
        t = self.clock()
        actions = self.plan(obs, **request)
        return actions, self.clock() - t

    def reset(self, obs: Mapping[str, np.ndarray]) -> float:
        """Plan the first chunk synchronously (the robot waits for it); returns tick 0's time.

        `obs` counts as tick 0's observation and the first chunk starts there, nothing dropped.
        """
        self._drain()
        self.executor.reset(obs, self.clock())
        actions, latency = self._timed_plan(self.executor.policy_obs(), {})
        self.latencies.append(latency)
        t0 = self.clock()
        self.executor.reset(obs, t0)
        self.executor.add_chunk(actions, t0, now=t0)
        self._last_plan_tick = 0
        return t0

    def step(self, obs: Mapping[str, np.ndarray] | None, t: float) -> np.ndarray | None:
        """Observation taken at tick time t (None: none new) -> the action to command now (None: hold)."""
        ex = self.executor
        if obs is not None:
            ex.observe(obs, t)
        if self._inflight is not None and self._inflight[0].done():
            future, obs_time = self._inflight
            self._inflight = None
            actions, latency = future.result()  # a failed plan raises here
            self.latencies.append(latency)
            # Ticks before t are past; t's own action is the one commanded now, so it still counts.
            ex.add_chunk(actions, obs_time, now=t)
        if self._inflight is None and self._should_plan(t):
            req = ex.strategy.request(ex.schedule, ex.tick(t), self._lead())
            self._inflight = (self._pool.submit(self._timed_plan, ex.policy_obs(), req.kwargs()), t)
            self._last_plan_tick = ex.tick(t)
        return ex.action_at(t)

    def _lead(self) -> int:
        """Ticks a reply is expected to take: the recent worst latency, at least one tick."""
        recent = max(self.latencies[-5:], default=0.0)
        return max(1, math.ceil(recent / self.dt - 1e-9))

    def _should_plan(self, t: float) -> bool:
        ex = self.executor
        if ex.strategy.waits:
            return ex.remaining(t) == 0
        if ex.remaining(t) <= self._lead():
            return True
        return (
            self.replan_every is not None and ex.tick(t) - self._last_plan_tick >= self.replan_every
        )

    def _drain(self) -> None:
        if self._inflight is not None:
            try:
                self._inflight[0].result()
            except Exception:
                pass
            self._inflight = None

    def close(self) -> None:
        self._drain()
        self._pool.shutdown(wait=True)
