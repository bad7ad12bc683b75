"""Rollout evaluation, measured as the paper measured it: each episode's score is its max reward
(reward = clip(coverage / 0.95, 0, 1)); `mean_score` averages it over the test seeds
(100000..100049 by default), episodes capped at 300 env steps, actions executed in chunks of Ta.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from diffusion_policy.chunking import ObsHistory, as_obs_dict
from diffusion_policy.config import EvalConfig, TaskConfig
from diffusion_policy.errors import UserError
from diffusion_policy.evaluation.metrics import EpisodeStats, finish_metrics, summarize
from diffusion_policy.execution import (
    DEFAULT_BID_SAMPLES,
    DelayedExecution,
    ExecutionError,
    ExecutionSpec,
    PlanRequest,
    Smoothness,
    check_delay,
)
from diffusion_policy.threads import adapt_threads


class EvalError(UserError, RuntimeError):
    """An evaluation could not finish (for example an env worker crashed or hung)."""


class VideoRecorder(gym.Wrapper):
    """Records `render()` frames of one episode to `video_path` (set per env through set_attr)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.video_path: str | None = None
        self._frames: list[np.ndarray] = []

    def reset(self, **kwargs):
        self._flush()
        out = super().reset(**kwargs)
        if self.video_path:
            self._frames = [self.env.render()]
        return out

    def step(self, action):
        out = super().step(action)
        if self.video_path and self._frames is not None:
            self._frames.append(self.env.render())
            if out[2] or out[3]:
                self._flush()
        return out

    def _flush(self) -> None:
        if self.video_path and self._frames:
            from diffusion_policy.video import write_video

            write_video(self.video_path, self._frames, fps=self.metadata.get("render_fps", 10))
            self.video_path = None
        self._frames = []

    def close(self):
        self._flush()
        super().close()


def make_env(
    env_id: str, obs_type: str, max_steps: int, video_size: int, env_kwargs: dict | None = None
) -> gym.Env:
    """`env_kwargs` (task.env_kwargs) go to gymnasium.make as given; without them, Push-T's obs_type."""
    import envs  # noqa: F401  (registers PushT-v0)

    env = gym.make(
        env_id,
        **(dict(env_kwargs) if env_kwargs else {"obs_type": obs_type}),
        render_mode="rgb_array",
        render_size=video_size,
        max_episode_steps=max_steps,
    )
    return VideoRecorder(env)


class Actor:
    """What evaluation needs from a policy: obs {key: (B, To, ...)} numpy -> actions (B, Ta, Da)
    (`__call__`), or the plan's whole future (B, F, Da) given the executing prefix (`plan`)."""

    def __init__(self, policy: torch.nn.Module, seed: int = 0, rtc_beta: float | None = None):
        from diffusion_policy.policies.guidance import RTC_MAX_GUIDANCE

        self.policy = policy
        self.rtc_beta = RTC_MAX_GUIDANCE if rtc_beta is None else rtc_beta
        self.n_obs_steps = policy.config.n_obs_steps
        self.horizon = policy.config.horizon
        self.n_action_steps = policy.config.n_action_steps
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        adapt_threads()
        with torch.no_grad():
            out = self.policy.predict_action_chunk(obs, generator=self.generator)
        return out["action"].float().cpu().numpy()

    def plan(
        self,
        obs: dict[str, np.ndarray],
        prefix: np.ndarray | None = None,
        delay: int = 0,
        guidance: str = "none",
        n_samples: int = DEFAULT_BID_SAMPLES,
    ) -> np.ndarray:
        """The future (B, F, Da) for ticks t.. of the newest observation; see policies/guidance.py."""
        from diffusion_policy.policies.guidance import plan_chunk

        adapt_threads()
        if prefix is not None:
            prefix = torch.as_tensor(prefix, dtype=torch.float32, device=self.policy.device)
        out = plan_chunk(
            self.policy, obs, generator=self.generator, prefix=prefix, delay=delay,
            guidance=guidance, n_samples=n_samples, max_guidance=self.rtc_beta,
        )  # fmt: skip
        return out["action_pred"][:, self.n_obs_steps - 1 :].float().cpu().numpy()


# progress(env steps done, episodes done), where an episode that ended counts as max_steps
Progress = Callable[[int, int], None]


def evaluate(
    actor: Any,
    task: TaskConfig,
    cfg: EvalConfig,
    out_dir: str | Path | None = None,
    progress: bool | Progress = True,
    info: dict[str, Any] | None = None,
    execution: ExecutionSpec | None = None,
) -> dict[str, Any]:
    """Roll out `actor` on seeds seed_start.. in waves of parallel envs; write metrics.json and videos.

    `progress`: True draws a bar that moves every env step (one wave of 50 episodes is most of an
    evaluation), or give a callable. `info` is recorded in metrics.json as given. `execution`: the
    strategy and simulated delay (default: synchronous, no delay, the actor's n_action_steps).
    """
    spec = execution or ExecutionSpec()
    driver = _driver(actor, spec)
    meter = Smoothness()
    out = Path(out_dir) if out_dir else None
    if out:
        (out / "videos").mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seed_start, cfg.seed_start + cfg.n_episodes))
    # One wave of all episodes keeps the policy batch large: sampling, not the env, dominates the cost.
    n_envs = min(cfg.n_envs or cfg.n_episodes, cfg.n_episodes)
    venv = _open_vector_env(task, cfg, n_envs)
    tracker = _StepTracker(progress, cfg)
    rows: list[dict[str, Any]] = []
    t0, finished = time.time(), False
    try:
        for w in range(0, cfg.n_episodes, n_envs):
            wave = seeds[w : w + n_envs]
            pad = n_envs - len(wave)  # the last wave's spare envs rerun its last seed, unrecorded
            paths = [video_path(out, w + i, s, cfg.n_videos) for i, s in enumerate(wave)]
            on_step = tracker.wave(len(wave))
            r = _run_wave(
                venv,
                actor,
                task.obs_type,
                wave + wave[-1:] * pad,
                paths + [None] * pad,
                cfg,
                on_step,
                driver,
                meter,
            )
            rows.extend(r[: len(wave)])
        finished = True
    finally:
        tracker.close()
        close_vector_env(venv, cfg.worker_timeout_s, graceful=finished)
    metrics = summarize(seeds, rows)
    metrics["execution"] = spec.describe(driver.n_action_steps)
    metrics["smoothness"] = meter.summary()
    return finish_metrics(metrics, started=t0, seed_start=cfg.seed_start, out=out, info=info)


def _driver(actor: Any, spec: ExecutionSpec) -> DelayedExecution:
    """The tick loop of `spec` for this actor, after checking that its plans can cover the delay."""
    n_action_steps = spec.n_action_steps or getattr(actor, "n_action_steps", None)
    horizon = getattr(actor, "horizon", None)
    if horizon is not None and n_action_steps is not None:
        check_delay(spec.delay, n_action_steps, horizon, actor.n_obs_steps)
    return DelayedExecution(spec.build(n_action_steps), spec.delay, n_action_steps)


def _planner(actor: Any, history: ObsHistory) -> Callable[[PlanRequest], np.ndarray]:
    """Plans from the newest observations; an actor without `plan` gives its (B, Ta, Da) chunk."""
    plan = getattr(actor, "plan", None)

    def call(request: PlanRequest) -> np.ndarray:
        if plan is not None:
            return plan(history.stacked(), **request.kwargs())
        if request.prefix is not None:
            raise ExecutionError(
                f"{type(actor).__name__} has no plan(obs, prefix, ...), so it cannot run strategy "
                f"{request.guidance}"
            )
        return actor(history.stacked())

    return call


def video_path(out: Path | None, index: int, seed: int, n_videos: int) -> str | None:
    """Where episode `index` (of seed `seed`) is recorded; None past the first n_videos."""
    return str(out / "videos" / f"seed_{seed}.mp4") if out and index < n_videos else None


class _StepTracker:
    """Counts env steps over all waves, an ended episode as its full max_steps, so progress moves
    every step and ends at exactly n_episodes * max_steps."""

    def __init__(self, progress: bool | Progress, cfg: EvalConfig):
        self.bar = None
        self.max_steps, self.steps, self.episodes = cfg.max_steps, 0, 0
        if callable(progress):
            self.report = progress
        elif progress:
            from tqdm import tqdm

            total = cfg.n_episodes * cfg.max_steps
            self.bar = tqdm(total=total, desc="eval", unit="step", leave=False)
            self.report = self._draw
        else:
            self.report = None

    def wave(self, n_real: int) -> Callable[[np.ndarray, np.ndarray], None]:
        """The per-step callback of one wave whose first n_real envs are recorded episodes."""
        base_steps, base_episodes = self.steps, self.episodes

        def on_step(steps: np.ndarray, done: np.ndarray) -> None:
            credit = np.where(done[:n_real], self.max_steps, steps[:n_real])
            self.steps = base_steps + int(credit.sum())
            self.episodes = base_episodes + int(done[:n_real].sum())
            if self.report:
                self.report(self.steps, self.episodes)

        return on_step

    def _draw(self, steps: int, episodes: int) -> None:
        self.bar.set_postfix_str(f"{episodes} episodes done", refresh=False)
        self.bar.update(steps - self.bar.n)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _open_vector_env(task: TaskConfig, cfg: EvalConfig, n_envs: int) -> gym.vector.VectorEnv:
    extra = {"env_kwargs": dict(task.env_kwargs)} if task.env_kwargs else {}
    fn = partial(make_env, task.env_id, task.obs_type, cfg.max_steps, cfg.video_size, **extra)
    # Episodes end at different steps; NEXT_STEP autoreset lets a finished env be stepped along with the
    # rest (it resets, and its results are masked out) where DISABLED would refuse the whole batch.
    vector = (
        cfg.vector if cfg.vector != "auto" else ("async" if (os.cpu_count() or 1) >= 8 else "sync")
    )
    if vector == "async":
        return AsyncVectorEnv(
            [fn] * n_envs,
            autoreset_mode=AutoresetMode.NEXT_STEP,
            context="spawn" if os.name != "posix" else None,
        )
    return SyncVectorEnv([fn] * n_envs, autoreset_mode=AutoresetMode.NEXT_STEP)


def close_vector_env(venv: gym.vector.VectorEnv, timeout: float, graceful: bool = True) -> None:
    """Close the envs without ever hanging.

    gymnasium's `AsyncVectorEnv.close()` waits on the worker pipes with no timeout, and its
    terminate sends SIGTERM, which a stopped (SIGSTOP) process never acts on: so ask the workers
    to close within `timeout` (only after a clean finish), then SIGKILL whatever is left.
    """
    if not isinstance(venv, AsyncVectorEnv):
        try:
            venv.close()
        except Exception:
            pass  # an env that failed may fail to close; its error was already reported
        return
    pipes = [p for p in venv.parent_pipes if p is not None]  # None: a worker that raised
    deadline = time.monotonic() + timeout
    if graceful:
        try:
            for pipe in pipes:
                pipe.send(("close", None))
            for pipe in pipes:
                if pipe.poll(max(0.0, deadline - time.monotonic())):
                    pipe.recv()
            for process in venv.processes:
                process.join(max(0.0, deadline - time.monotonic()))
        except (OSError, EOFError):
            pass
    for process in venv.processes:
        if process.is_alive():
            process.kill()
    for pipe in pipes:
        pipe.close()
    for process in venv.processes:
        process.join(timeout)
    venv.closed = True  # so gymnasium's __del__ does not try to close it again


def _run_wave(
    venv: gym.vector.VectorEnv,
    actor: Any,
    obs_key: str,
    seeds: list[int],
    video_paths: list[str | None],
    cfg: EvalConfig,
    on_step: Callable[[np.ndarray, np.ndarray], None],
    driver: DelayedExecution,
    meter: Smoothness,
) -> list[dict[str, Any]]:
    """One wave, one control tick at a time: the driver says when plans are requested and merged."""
    n = len(seeds)
    venv.set_attr("video_path", video_paths)
    obs, info = _call(venv, "reset", cfg, seed=seeds)
    history = ObsHistory(actor.n_obs_steps, time_axis=1)
    history.reset(as_obs_dict(obs, obs_key))
    plan = _planner(actor, history)
    driver.reset()
    meter.start()
    done = np.zeros(n, bool)
    stats = EpisodeStats(n, venv.metadata, info)
    action = None
    while not done.all():
        due, plan_id = driver.step(plan)
        meter.add_dropped(driver.dropped, ~done)
        if due is None:  # sync under delay: the robot holds its last command while it waits
            meter.holds += int((~done).sum())
        else:
            meter.record(due, plan_id, ~done)
            action = due
        obs, reward, terminated, truncated, info = _call(venv, "step", cfg, action)
        stats.step(reward, info, ~done)
        done |= terminated | truncated
        on_step(stats.steps, done)
        history.push(as_obs_dict(obs, obs_key))
    return stats.rows()


def _call(venv: gym.vector.VectorEnv, method: str, cfg: EvalConfig, *args, **kwargs):
    """reset/step with a timeout, so a crashed or hung env worker is reported, never waited on forever."""
    try:
        if isinstance(venv, AsyncVectorEnv):
            if method == "reset":
                venv.reset_async(*args, **kwargs)
                return venv.reset_wait(timeout=cfg.worker_timeout_s)
            venv.step_async(*args)
            return venv.step_wait(timeout=cfg.worker_timeout_s)
        return getattr(venv, method)(*args, **kwargs)
    except mp.TimeoutError:
        raise EvalError(
            f"an env worker did not answer {method} within {cfg.worker_timeout_s:g} s "
            f"(stopped or hung){_dead_workers(venv)}; its processes were killed"
        ) from None
    except (EOFError, BrokenPipeError, ConnectionResetError) as e:
        raise EvalError(
            f"an env worker died during {method}: {type(e).__name__}: {e}"
            f"{_dead_workers(venv, settle_s=1.0)}"
        ) from None
    except UserError:
        raise
    except Exception as e:
        raise EvalError(f"an env worker failed during {method}: {type(e).__name__}: {e}") from None


def _dead_workers(venv: gym.vector.VectorEnv, settle_s: float = 0.0) -> str:
    """', worker 1 (pid 42) killed by SIGKILL' for each worker process that is gone.

    A dead worker's pipe can report EOF before the process is reaped, so its exit code would still
    read None; `settle_s` waits up to that long in all for such processes to be reaped."""
    import signal

    parts = []
    deadline = time.monotonic() + settle_s
    for i, p in enumerate(getattr(venv, "processes", [])):
        if p.exitcode is None and (left := deadline - time.monotonic()) > 0:
            p.join(timeout=left)
        code = p.exitcode
        if code is not None:
            how = f"exited with {code}"
            if code < 0:
                how = (
                    f"killed by {signal.Signals(-code).name}"
                    if -code in signal.valid_signals()
                    else how
                )
            parts.append(f"worker {i} (pid {p.pid}) {how}")
    return "".join(", " + s for s in parts)


def check_server(meta: dict[str, Any], cfg: Any, checkpoint: str) -> None:
    """Refuse a server whose policy is not this checkpoint (its weights' sha256 in the metadata),
    or observes something else than this checkpoint's task, naming both."""
    from diffusion_policy.checkpoint import resolve_checkpoint
    from diffusion_policy.serving.protocol import checkpoint_digest
    from diffusion_policy.serving.server import obs_type_of

    mine_obs = obs_type_of(cfg.task)  # what the server's metadata says of the same task
    if meta.get("task", {}).get("obs_type") != mine_obs:
        raise UserError(
            f"the server's policy observes {meta.get('task', {}).get('obs_type')!r}, but {checkpoint} "
            f"is a {mine_obs!r} checkpoint"
        )
    served = meta.get("checkpoint") or {}
    if not served.get("sha256"):
        raise UserError(
            f"the server does not say which checkpoint it serves (no checkpoint sha256 in its "
            f"metadata), so its score cannot be filed under {checkpoint}: serve it with this dp serve"
        )
    path = resolve_checkpoint(checkpoint)
    mine = checkpoint_digest(path)
    if served["sha256"] != mine:
        raise UserError(
            f"the server serves another checkpoint: {served.get('path', '?')} (step "
            f"{served.get('step')}, sha256 {served['sha256'][:12]}), not {path} (step "
            f"{_step_of(path)}, sha256 {mine[:12]})"
        )


def _step_of(path: Path) -> Any:
    try:
        return json.loads((path / "meta.json").read_text()).get("step")
    except (OSError, ValueError):
        return None
