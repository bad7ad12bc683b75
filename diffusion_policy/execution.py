"""Execution strategies: how a robot joins the chunk it is executing to the next one, which arrives
`delay` control ticks after it was requested. Numpy only (no torch): the same classes run in
`dp eval --delay` (batched envs), in `chunking.RealtimeController` (one robot, wall clock) and in a
robot loop. The guidance itself (rtc, bid) runs where the policy runs (policies/guidance.py).

One frame for every strategy (see /work/notes/contract14.md): a plan requested at tick t answers the
observation of tick t; its future (F actions, F = horizon - n_obs_steps + 1) is for ticks t .. t+F-1.
Its indices 0..d-1 are stale on arrival at t+d. A strategy says what to ask the planner for
(`request`: the executing plan's `prefix` for ticks t.., the delay, the guidance) and how to put the
returned future on the tick schedule (`merge`).

    sync      the robot waits: holds its last action while the plan computes, then runs the new
              plan from index 0 (nothing is stale, the observation is d ticks old)
    async     switch to the new plan at the tick it arrives (index d), as the original's robot
    ensemble  average every plan's prediction for a tick, weights exp(-m * i), i = 0 the oldest (ACT)
    rtc       as async, and the planner inpaints the new plan onto the executing prefix
    bid       as async, and the planner picks the most prefix-coherent of n_samples candidates
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from diffusion_policy.errors import UserError

STRATEGY_NAMES = ("sync", "async", "ensemble", "rtc", "bid")
DEFAULT_ENSEMBLE_DECAY = 0.01  # ACT's m
DEFAULT_BID_SAMPLES = 16


class ExecutionError(UserError, ValueError):
    """A delay, strategy or chunk length that cannot be executed; the message names it."""


@dataclass(frozen=True)
class PlanRequest:
    """What a strategy asks the planner for, in the planner's layout (prefix (B, P, Da) or (P, Da))."""

    prefix: np.ndarray | None = None
    delay: int = 0
    guidance: str = "none"
    n_samples: int = DEFAULT_BID_SAMPLES

    def kwargs(self) -> dict[str, Any]:
        """The planner's keyword arguments (the wire fields); {} is a plain request, as before."""
        if self.prefix is None:
            return {}
        return {
            "prefix": self.prefix,
            "delay": self.delay,
            "guidance": self.guidance,
            "n_samples": self.n_samples,
        }


def blend(preds: Sequence[np.ndarray], decay: float | None) -> np.ndarray:
    """Temporal ensembling (ACT): weights exp(-decay * i), i = 0 the oldest; None: the newest wins."""
    if decay is None or len(preds) == 1:
        return preds[-1]
    w = np.exp(-decay * np.arange(len(preds)))
    return np.tensordot(w / w.sum(), np.stack(preds), axes=1).astype(preds[-1].dtype)


class Schedule:
    """tick -> the predictions for it, oldest first, each tagged with its plan's id.

    An action is (Da,) for one robot or (B, Da) for a batch of envs that share one tick counter.
    """

    def __init__(self) -> None:
        self._plans: dict[int, list[tuple[int, np.ndarray]]] = {}

    def clear(self) -> None:
        self._plans.clear()

    def place(self, first: int, actions: Sequence[np.ndarray], plan_id: int, replace: bool) -> int:
        """Put actions[k] at tick first + k; `replace` drops every prediction from `first` on first.

        Returns how many ticks of older plans were replaced.
        """
        superseded = 0
        if replace and len(actions):
            stale = [k for k in self._plans if k >= first]
            superseded = len(stale)
            for k in stale:
                del self._plans[k]
        for k, a in enumerate(actions):
            self._plans.setdefault(first + k, []).append((plan_id, a))
        return superseded

    def remaining(self, tick: int) -> int:
        """Ticks from `tick` on that have an action."""
        return sum(1 for k in self._plans if k >= tick)

    def peek(self, tick: int, decay: float | None) -> tuple[np.ndarray, int] | None:
        """(the action due at `tick`, the id of the newest plan in it), or None if none is planned."""
        preds = self._plans.get(tick)
        if not preds:
            return None
        return blend([a for _, a in preds], decay), preds[-1][0]

    def pop(self, tick: int, decay: float | None) -> tuple[np.ndarray, int] | None:
        """As peek, and forget `tick` and everything before it."""
        out = self.peek(tick, decay)
        for k in [k for k in self._plans if k <= tick]:
            del self._plans[k]
        return out

    def prefix(self, tick: int, decay: float | None, limit: int | None = None) -> np.ndarray | None:
        """(P, ...) what the robot will execute at ticks tick, tick+1, .. as far as the plan reaches."""
        out: list[np.ndarray] = []
        while limit is None or len(out) < limit:
            due = self.peek(tick + len(out), decay)
            if due is None:
                break
            out.append(due[0])
        return np.stack(out) if out else None


class Merged(NamedTuple):
    dropped: int  # actions of the new plan that were stale on arrival
    superseded: int  # ticks of older plans it replaced


class Strategy:
    """The interface: `request` (what to ask the planner for) and `merge` (how to schedule the reply).

    `merge(schedule, plan_id, tick, actions, start)`: actions[k] (time-major) answers tick + k and
    indices before `start` are past.
    """

    name: ClassVar[str]
    guidance: ClassVar[str] = "none"
    waits: ClassVar[bool] = False  # the robot holds while a plan computes (sync)
    decay: float | None = None  # ensembling weight; None: the newest plan wins each tick
    n_samples: int = DEFAULT_BID_SAMPLES

    def request(self, schedule: Schedule, tick: int, delay: int, time_axis: int = 0) -> PlanRequest:
        """A plain request; rtc and bid add the executing prefix (see _PrefixStrategy)."""
        return PlanRequest(delay=delay)

    def merge(
        self, schedule: Schedule, plan_id: int, tick: int, actions: Sequence[np.ndarray], start: int
    ) -> Merged:
        replaced = schedule.place(tick + start, actions[start:], plan_id, self.decay is None)
        return Merged(start, replaced)

    def action_at(self, schedule: Schedule, tick: int) -> tuple[np.ndarray, int] | None:
        """(action, plan id) due at `tick`, forgetting what is past; None: hold the last command."""
        return schedule.pop(tick, self.decay)

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name}


class Sync(Strategy):
    """The robot waits for each plan and runs it from index 0; `execute`: at most that many of it."""

    name = "sync"
    waits = True

    def __init__(self, execute: int | None = None):
        self.execute = execute

    def merge(self, schedule, plan_id, tick, actions, start):
        return Merged(0, schedule.place(tick + start, actions[: self.execute], plan_id, True))


class Async(Strategy):
    """Naive asynchronous execution: the new plan replaces the old one from the tick it arrives."""

    name = "async"


class Ensemble(Strategy):
    """Temporal ensembling: every plan's prediction for a tick is averaged (`blend`)."""

    name = "ensemble"

    def __init__(self, decay: float = DEFAULT_ENSEMBLE_DECAY):
        self.decay = float(decay)

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "ensemble_decay": self.decay}


class _PrefixStrategy(Strategy):
    """Switches as async, and sends the planner what the robot will execute from the request on."""

    def __init__(self, n_samples: int = DEFAULT_BID_SAMPLES):
        self.n_samples = int(n_samples)

    def request(self, schedule, tick, delay, time_axis=0):
        prefix = schedule.prefix(tick, self.decay)
        if prefix is None:
            return PlanRequest(delay=delay)  # nothing executing: a plain plan
        return PlanRequest(
            prefix=np.moveaxis(prefix, 0, time_axis),
            delay=min(delay, len(prefix)),
            guidance=self.guidance,
            n_samples=self.n_samples,
        )


class RTC(_PrefixStrategy):
    """Real-time chunking: the new plan is inpainted onto the frozen prefix (guidance "rtc")."""

    name = "rtc"
    guidance = "rtc"


class BID(_PrefixStrategy):
    """Bidirectional decoding: best of n_samples candidates by coherence with the prefix."""

    name = "bid"
    guidance = "bid"

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "bid_samples": self.n_samples}


def make_strategy(
    name: str,
    *,
    ensemble_decay: float = DEFAULT_ENSEMBLE_DECAY,
    n_samples: int = DEFAULT_BID_SAMPLES,
    execute: int | None = None,
) -> Strategy:
    """A strategy by name; `execute` (sync only): actions run per plan before the robot waits again."""
    if name == "sync":
        return Sync(execute)
    if name == "async":
        return Async()
    if name == "ensemble":
        return Ensemble(ensemble_decay)
    if name == "rtc":
        return RTC(n_samples)
    if name == "bid":
        return BID(n_samples)
    raise ExecutionError(f"strategy {name!r}: expected one of {', '.join(STRATEGY_NAMES)}")


def check_delay(delay: int, n_action_steps: int, horizon: int, n_obs_steps: int) -> None:
    """Refuse a delay or chunk length the policy cannot cover, naming the flag and the bound."""
    future = horizon - n_obs_steps + 1
    if delay < 0:
        raise ExecutionError(f"--delay {delay}: must be at least 0")
    if n_action_steps < 1:
        raise ExecutionError(f"--n-action-steps {n_action_steps}: must be at least 1")
    if delay and delay >= horizon - n_obs_steps:  # d = 0 is always possible (IBC: horizon = To)
        raise ExecutionError(
            f"--delay {delay}: must be below horizon - n_obs_steps = {horizon} - {n_obs_steps} "
            f"= {horizon - n_obs_steps}"
        )
    if delay + n_action_steps > future:
        raise ExecutionError(
            f"--delay {delay} with --n-action-steps {n_action_steps}: a plan has only {future} "
            f"future actions (horizon {horizon} - n_obs_steps {n_obs_steps} + 1), so delay + "
            f"n_action_steps must be at most {future}"
        )


@dataclass(frozen=True)
class ExecutionSpec:
    """How `evaluate` executes plans: strategy, simulated delay in ticks, actions run per plan
    (None: the actor's n_action_steps). The default is the synchronous evaluation of the paper."""

    strategy: str = "sync"
    delay: int = 0
    n_action_steps: int | None = None
    ensemble_decay: float = DEFAULT_ENSEMBLE_DECAY
    n_samples: int = DEFAULT_BID_SAMPLES

    def build(self, n_action_steps: int | None) -> Strategy:
        return make_strategy(
            self.strategy,
            ensemble_decay=self.ensemble_decay,
            n_samples=self.n_samples,
            execute=n_action_steps,
        )

    def describe(self, n_action_steps: int | None) -> dict[str, Any]:
        """What metrics.json records of it."""
        return {
            **self.build(n_action_steps).describe(),
            "delay": self.delay,
            "n_action_steps": n_action_steps,
        }


Planner = Callable[[PlanRequest], np.ndarray]  # request -> future (B, F, Da)


@dataclass
class _Pending:
    tick: int  # requested at
    arrives: int
    future: np.ndarray  # (B, F, Da)
    delay: int
    plan_id: int


class DelayedExecution:
    """A controlled inference delay on a tick counter (no wall clock), for a batch of envs.

    A plan is requested every `n_action_steps` ticks (sync: when the last one has run its
    n_action_steps), answers the observation of its tick, and is merged `delay` ticks later; the
    first plan of an episode is synchronous. `step(plan)` returns the action of the current tick
    ((B, Da), or None: hold) and the id of its newest plan, and advances the tick.
    """

    def __init__(self, strategy: Strategy, delay: int, n_action_steps: int | None):
        """n_action_steps None: as many as the first plan holds (an actor that returns only Ta)."""
        self.strategy, self.delay, self.n_action_steps = strategy, delay, n_action_steps
        self.schedule = Schedule()
        self.reset()

    def reset(self) -> None:
        self.schedule.clear()
        self.tick = 0
        self.n_plans = 0
        self.dropped = 0  # stale actions per row, at the last step
        self._next_request = 0
        self._pending: deque[_Pending] = deque()

    def step(self, plan: Planner) -> tuple[np.ndarray | None, int]:
        t, self.dropped = self.tick, 0
        if t == self._next_request:
            self._request(plan, t)
        while self._pending and self._pending[0].arrives == t:
            p = self._pending.popleft()
            actions = np.moveaxis(p.future, 1, 0)  # (F, B, Da): time-major
            self.dropped += self.strategy.merge(
                self.schedule, p.plan_id, p.tick, actions, p.delay
            ).dropped
        self.tick += 1
        due = self.strategy.action_at(self.schedule, t)
        return (None, -1) if due is None else due

    def _request(self, plan: Planner, t: int) -> None:
        d = self.delay if self.n_plans else 0  # nothing executes before the first plan
        future = np.asarray(plan(self.strategy.request(self.schedule, t, d, time_axis=1)))
        if future.ndim != 3:
            raise ExecutionError(f"the planner returned shape {future.shape}, not (B, F, Da)")
        if self.n_action_steps is None:
            self.n_action_steps = future.shape[1]
        if future.shape[1] < self.delay + self.n_action_steps:
            raise ExecutionError(
                f"the planner returned {future.shape[1]} future actions; delay {self.delay} + "
                f"n_action_steps {self.n_action_steps} need {self.delay + self.n_action_steps}"
            )
        self._pending.append(_Pending(t, t + d, future, d, self.n_plans))
        self.n_plans += 1
        wait = d if self.strategy.waits else 0
        self._next_request = t + wait + self.n_action_steps


class Smoothness:
    """Action jumps ||a_k - a_(k-1)|| at chunk seams (the first action of a new plan against the
    last one executed before it) and inside chunks (consecutive actions of one plan), per env row;
    held ticks are not actions and are skipped. Also counts stale actions dropped and holds."""

    def __init__(self) -> None:
        self.seam: list[np.ndarray] = []
        self.inside: list[np.ndarray] = []
        self.dropped = 0
        self.holds = 0
        self._last: np.ndarray | None = None
        self._last_id: np.ndarray | None = None

    def start(self) -> None:
        """A new set of episodes: forget the last actions (a seam never spans two episodes)."""
        self._last = self._last_id = None

    def record(self, action: np.ndarray, plan_id: int, live: np.ndarray | None = None) -> None:
        """action (B, Da) (or (Da,) for one robot) executed by the rows where `live` is True."""
        action = np.asarray(action, dtype=float).reshape(-1, np.shape(action)[-1])
        n = len(action)
        live = np.ones(n, bool) if live is None else np.asarray(live, bool)
        if self._last is None:
            self._last, self._last_id = np.full_like(action, np.nan), np.full(n, -1)
        rows = live & (self._last_id >= 0)
        jump = np.linalg.norm(action - self._last, axis=-1)
        seam = self._last_id != plan_id
        self.seam.append(jump[rows & seam])
        self.inside.append(jump[rows & ~seam])
        self._last[live], self._last_id[live] = action[live], plan_id

    def add_dropped(self, per_row: int, live: np.ndarray | None = None) -> None:
        self.dropped += per_row * (1 if live is None else int(np.sum(live)))

    def absorb(self, other: Smoothness) -> None:
        """Add another meter's counts (another robot's episodes)."""
        self.seam += other.seam
        self.inside += other.inside
        self.dropped += other.dropped
        self.holds += other.holds

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, parts in (("seam", self.seam), ("inside", self.inside)):
            x = np.concatenate(parts) if parts else np.zeros(0)
            out[f"{name}_jump_mean"] = float(x.mean()) if len(x) else None
            out[f"{name}_jump_p95"] = float(np.percentile(x, 95)) if len(x) else None
            out[f"n_{name}"] = len(x)
        out["dropped_actions"] = int(self.dropped)
        out["hold_ticks"] = int(self.holds)
        return out
