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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.chunking import RealtimeController, as_obs_dict

Planner = Callable[[dict[str, np.ndarray]], np.ndarray]  # obs {key: (To, ...)} -> actions (Ta, Da)


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
    max_reward, success, final_cov = 0.0, False, float(info["coverage"])
    holds = late = steps = 0
    last_action: np.ndarray | None = None
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
        last_action = action
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        max_reward = max(max_reward, float(reward))
        final_cov = float(info["coverage"])
        success |= final_cov > 0.95
        if terminated or truncated:
            break
    return {
        "max_reward": max_reward,
        "success": success,
        "final_cov": final_cov,
        "steps": steps,
        "holds": holds,
        "late_ticks": late,
        "dropped": controller.executor.n_dropped,
        "plans": len(controller.latencies),
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
) -> dict[str, Any]:
    """Like `evaluation.evaluate` (same seeds, same metrics) with robots paced at task.control_hz.

    `make_planner(i)` gives robot i its planner; robots take the next seed from a shared list.
    """
    import json

    from diffusion_policy.evaluation.rollout import EvalError, make_env, summarize

    out = Path(out_dir) if out_dir else None
    if out:
        (out / "videos").mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seed_start, cfg.seed_start + cfg.n_episodes))
    dt = 1.0 / task.control_hz
    todo = list(enumerate(seeds))
    lock = threading.Lock()
    results: dict[int, dict[str, Any]] = {}
    latencies: list[float] = []
    errors: list[BaseException] = []

    def robot(index: int) -> None:
        try:
            planner = make_planner(index)
            env = make_env(task.env_id, task.obs_type, cfg.max_steps, cfg.video_size)
            try:
                while not errors:
                    with lock:
                        if not todo:
                            return
                        n, seed = todo.pop(0)
                    env.video_path = (
                        str(out / "videos" / f"seed_{seed}.mp4")
                        if out and n < cfg.n_videos
                        else None
                    )
                    ctrl = RealtimeController(
                        planner,
                        n_obs_steps,
                        dt,
                        ensemble_decay=ensemble_decay,
                        replan_every=replan_every,
                        drop_margin_s=drop_margin_s,
                    )
                    try:
                        r = run_episode_realtime(env, seed, ctrl, task.obs_type, cfg.max_steps)
                    finally:
                        ctrl.close()
                    with lock:
                        results[seed] = r
                        latencies.extend(ctrl.latencies[1:])  # the first plan is not paced
            finally:
                env.close()
        except BaseException as e:
            with lock:
                errors.append(e)

    t_start = time.time()
    threads = [
        threading.Thread(target=robot, args=(i,), name=f"robot-{i}", daemon=True)
        for i in range(max(1, min(n_robots, len(seeds))))
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        e = errors[0]
        raise EvalError(f"realtime rollout failed: {type(e).__name__}: {e}") from e
    rows = [results[s] for s in seeds]
    col = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
    metrics = summarize(seeds, col["max_reward"], col["success"], col["final_cov"], col["steps"])
    lat = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    metrics["realtime"] = {
        "control_hz": task.control_hz,
        "n_robots": len(threads),
        "plan_latency_ms_p50": float(np.percentile(lat, 50)),
        "plan_latency_ms_p99": float(np.percentile(lat, 99)),
        "plans": int(col["plans"].sum()),
        "dropped_actions": int(col["dropped"].sum()),
        "hold_ticks": int(col["holds"].sum()),
        "late_ticks": int(col["late_ticks"].sum()),
        "steps": int(col["steps"].sum()),
        "ensemble_decay": ensemble_decay,
        "replan_every": replan_every,
    }
    metrics["wall_time_s"] = round(time.time() - t_start, 2)
    metrics["seed_start"] = cfg.seed_start
    if out:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def evaluate_checkpoint_realtime(
    policy: Any,
    cfg: Any,
    ecfg: Any,
    out: Path,
    clients: list,
    *,
    server: str | None,
    token: str | None,
    checkpoint: str,
    seed: int,
    robots: int | None,
    ensemble: float | None,
    replan_every: int | None,
) -> dict[str, Any]:
    """Wall-clock paced rollouts; each robot plans through its own server connection, or through
    the in-process policy (one at a time, as robots sharing one local GPU would)."""
    import itertools
    import threading

    import torch

    from diffusion_policy.evaluation.rollout import check_server

    seeds = itertools.count(seed)
    if server:
        from diffusion_policy.serving.client import PolicyClient

        lock = threading.Lock()

        def make_planner(i: int):
            client = PolicyClient(server, token=token)
            with lock:
                clients.append(client)
            check_server(client.metadata, cfg, checkpoint)
            return lambda obs: client.infer(obs, seed=next(seeds))["actions"]

        n_obs_steps = cfg.policy.n_obs_steps
    else:
        actor_lock = threading.Lock()

        def make_planner(i: int):
            def plan(obs: dict[str, np.ndarray]) -> np.ndarray:
                generator = torch.Generator(device=policy.device).manual_seed(next(seeds))
                with actor_lock, torch.no_grad():
                    out = policy.predict_action_chunk(
                        {k: v[None] for k, v in obs.items()}, generator=generator
                    )
                return out["action"][0].float().cpu().numpy()

            return plan

        n_obs_steps = policy.config.n_obs_steps
    n_robots = robots or ecfg.n_envs or min(ecfg.n_episodes, 8)
    return evaluate_realtime(
        make_planner,
        n_obs_steps,
        cfg.task,
        ecfg,
        out,
        n_robots=n_robots,
        ensemble_decay=ensemble,
        replan_every=replan_every,
    )
