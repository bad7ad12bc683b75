"""Push-T as a stand-in robot: episodes paced by the wall clock at the task's control rate.

`dp eval CKPT --realtime [--server URL]`. Each simulated robot runs the loop a real one would
(PUSHT_SPEC §9): every tick (0.1 s at 10 Hz) it observes, commands the action due now, and the
env advances one step; inference runs in the background (`chunking.RealtimeController`) while the
robot keeps executing the queued actions, and actions already in the past when a chunk arrives
are dropped. When the queue runs dry the robot holds its last command. So latency costs score
here as it would on hardware, unlike `evaluate()`, which waits for every chunk.

Several robots run at once (threads), each with its own planner: for a server, its own
connection, so the server's micro-batching is exercised as with a fleet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.chunking import RealtimeController, as_obs_dict
from diffusion_policy.evaluation.metrics import EpisodeStats, finish_metrics, summarize
from diffusion_policy.evaluation.rollout import EvalError, make_env, video_path
from diffusion_policy.execution import Smoothness, Strategy

# obs {key: (To, ...)}, **request (execution.PlanRequest.kwargs) -> actions (Ta, Da)
Planner = Callable[..., np.ndarray]


def run_episode_realtime(
    env: Any,
    seed: int,
    controller: RealtimeController,
    obs_key: str,
    max_steps: int,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """One episode on the controller's clock; returns its score and timing counts."""
    obs, info = env.reset(seed=seed)
    clock, dt = controller.clock, controller.dt
    t0 = controller.reset(as_obs_dict(obs, obs_key))
    stats = EpisodeStats(1, getattr(env, "metadata", {}), info)
    holds = late = steps = 0
    last_action: np.ndarray | None = None
    meter = Smoothness()
    for i in range(max_steps):
        t = t0 + i * dt
        wait = t - clock()
        if wait > 0:
            sleep(wait)
        elif -wait > dt / 2:
            late += 1  # the loop itself fell behind (env or CPU too slow)
        action = controller.step(None if i == 0 else as_obs_dict(obs, obs_key), t)
        if action is None:
            holds += 1
            action = last_action
        else:
            meter.record(action, controller.executor.last_plan_id)
        last_action = action
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        stats.step(reward, info, np.ones(1, bool))
        if terminated or truncated:
            break
    return {
        "row": stats.rows()[0],
        "steps": steps,
        "holds": holds,
        "late_ticks": late,
        "dropped": controller.executor.n_dropped,
        "plans": len(controller.latencies),
        "smoothness": meter,
    }


@dataclass
class _Fleet:
    """What the robot threads share: the episodes still to run, results by seed, plan latencies,
    and the first error (which stops every robot at its next episode)."""

    todo: list[tuple[int, int]]  # (episode index, seed)
    lock: threading.Lock = field(default_factory=threading.Lock)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def next_episode(self) -> tuple[int, int] | None:
        with self.lock:
            return None if self.errors or not self.todo else self.todo.pop(0)

    def record(self, seed: int, result: dict[str, Any], latencies: list[float]) -> None:
        with self.lock:
            self.results[seed] = result
            self.latencies.extend(latencies)

    def fail(self, error: BaseException) -> None:
        with self.lock:
            self.errors.append(error)

    def run(self, n_robots: int, robot: Callable[..., None]) -> None:
        """Run `robot(index, fleet)` in n_robots threads until done; raise the first error."""
        threads = [
            threading.Thread(target=robot, args=(i, self), name=f"robot-{i}", daemon=True)
            for i in range(n_robots)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if self.errors:
            e = self.errors[0]
            raise EvalError(f"realtime rollout failed: {type(e).__name__}: {e}") from e


def _robot(
    index: int,
    fleet: _Fleet,
    make_planner: Callable[[int], Planner],
    make_controller: Callable[[Planner], RealtimeController],
    task: Any,
    cfg: Any,
    out: Path | None,
) -> None:
    """One robot thread: its own planner and env, episodes taken from the fleet until none is left."""
    try:
        planner = make_planner(index)
        env = make_env(
            task.env_id, task.obs_type, cfg.max_steps, cfg.video_size, task.env_kwargs or None
        )
        try:
            while (job := fleet.next_episode()) is not None:
                n, seed = job
                env.video_path = video_path(out, n, seed, cfg.n_videos)
                ctrl = make_controller(planner)
                try:
                    r = run_episode_realtime(env, seed, ctrl, task.obs_type, cfg.max_steps)
                finally:
                    ctrl.close()
                fleet.record(seed, r, ctrl.latencies[1:])  # the first plan is not paced
        finally:
            env.close()
    except BaseException as e:
        fleet.fail(e)


def _timing(rows: list[dict[str, Any]], latencies: list[float]) -> dict[str, Any]:
    """The wall-clock side of a realtime evaluation: plan latency and what the pacing cost."""
    col = {k: int(sum(r[k] for r in rows)) for k in ("plans", "dropped", "holds", "late_ticks")}
    lat = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return {
        "plan_latency_ms_p50": float(np.percentile(lat, 50)),
        "plan_latency_ms_p99": float(np.percentile(lat, 99)),
        "plans": col["plans"],
        "dropped_actions": col["dropped"],
        "hold_ticks": col["holds"],
        "late_ticks": col["late_ticks"],
        "steps": int(sum(r["steps"] for r in rows)),
    }


def evaluate_realtime(
    make_planner: Callable[[int], Planner],
    n_obs_steps: int,
    task: Any,
    cfg: Any,
    out_dir: str | Path | None = None,
    *,
    n_robots: int = 1,
    ensemble_decay: float | None = None,
    replan_every: int | None = None,
    drop_margin_s: float = 0.0,
    info: dict[str, Any] | None = None,
    strategy: Strategy | None = None,
) -> dict[str, Any]:
    """Like `rollout.evaluate` (same seeds, same metrics) with robots paced at task.control_hz.

    `make_planner(i)` gives robot i its planner; robots take the next seed from a shared list.
    `strategy` (execution.py) joins the chunks; default async, or ensemble with `ensemble_decay`.
    """
    out = Path(out_dir) if out_dir else None
    if out:
        (out / "videos").mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seed_start, cfg.seed_start + cfg.n_episodes))
    fleet = _Fleet(list(enumerate(seeds)))
    controller = partial(
        RealtimeController,
        n_obs_steps=n_obs_steps,
        dt=1.0 / task.control_hz,
        ensemble_decay=ensemble_decay,
        replan_every=replan_every,
        drop_margin_s=drop_margin_s,
        strategy=strategy,
    )
    t0 = time.time()
    n_robots = max(1, min(n_robots, len(seeds)))
    robot = partial(
        _robot, make_planner=make_planner, make_controller=controller, task=task, cfg=cfg, out=out
    )
    fleet.run(n_robots, robot)
    rows = [fleet.results[s] for s in seeds]
    metrics = summarize(seeds, [r["row"] for r in rows])
    meter = Smoothness()
    for r in rows:
        meter.absorb(r["smoothness"])
    meter.holds = 0  # counted with the wall clock's timing, as hold_ticks
    meter.dropped = sum(r["dropped"] for r in rows)  # stale on arrival, by the executors' clocks
    decay = ensemble_decay if strategy is None else strategy.decay
    metrics["realtime"] = {
        "control_hz": task.control_hz,
        "n_robots": n_robots,
        **_timing(rows, fleet.latencies),
        "ensemble_decay": decay,
        "replan_every": replan_every,
    }
    name = strategy.name if strategy else ("async" if ensemble_decay is None else "ensemble")
    metrics["execution"] = {"strategy": name, "delay": None, "n_action_steps": None}
    metrics["smoothness"] = meter.summary()
    return finish_metrics(metrics, started=t0, seed_start=cfg.seed_start, out=out, info=info)


def local_planners(policy: Any, seeds: Iterator[int]) -> Callable[[int], Planner]:
    """Planners on the in-process policy, one at a time (as robots sharing one local GPU would);
    each plan draws its noise from the next seed."""
    import torch

    lock = threading.Lock()

    def make_planner(i: int) -> Planner:
        def plan(obs: dict[str, np.ndarray], **request: Any) -> np.ndarray:
            from diffusion_policy.policies.guidance import plan_chunk

            generator = torch.Generator(device=policy.device).manual_seed(next(seeds))
            if request.get("prefix") is not None:
                prefix = torch.as_tensor(request["prefix"], dtype=torch.float32)
                request["prefix"] = prefix[None].to(policy.device)
            with lock:
                out = plan_chunk(
                    policy, {k: v[None] for k, v in obs.items()}, generator=generator, **request
                )
            return out["action"][0].float().cpu().numpy()

        return plan

    return make_planner


def server_planners(
    url: str,
    token: str | None,
    check: Callable[[dict[str, Any]], None],
    seeds: Iterator[int],
    stack: ExitStack,
) -> Callable[[int], Planner]:
    """Planners that each hold their own server connection (closed with `stack`), so the server
    micro-batches them as a fleet; `check(metadata)` refuses a server that serves another policy."""
    from diffusion_policy.serving.client import PolicyClient

    lock = threading.Lock()

    def make_planner(i: int) -> Planner:
        client = PolicyClient(url, token=token)
        with lock:
            stack.callback(client.close)
        check(client.metadata)
        return lambda obs, **request: client.infer(obs, seed=next(seeds), **request)["actions"]

    return make_planner
