"""Rollout evaluation, measured as the paper measured it: each episode's score is its max reward
(reward = clip(coverage / 0.95, 0, 1)); `mean_score` averages it over the test seeds
(100000..100049 by default), episodes capped at 300 env steps, actions executed in chunks of Ta.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
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


def make_env(env_id: str, obs_type: str, max_steps: int, video_size: int) -> gym.Env:
    import envs  # noqa: F401  (registers PushT-v0)

    env = gym.make(
        env_id,
        obs_type=obs_type,
        render_mode="rgb_array",
        render_size=video_size,
        max_episode_steps=max_steps,
    )
    return VideoRecorder(env)


def _interval(values: np.ndarray) -> list[float]:
    """95% normal-approximation confidence interval of a mean of values in [0, 1]."""
    n = len(values)
    if n < 2:
        return [float(values.mean()), float(values.mean())]
    half = 1.96 * values.std(ddof=1) / math.sqrt(n)
    return [max(0.0, float(values.mean() - half)), min(1.0, float(values.mean() + half))]


def _wilson(successes: int, n: int) -> list[float]:
    """95% Wilson interval of a rate; sane at 0 and 1 unlike the normal approximation."""
    z = 1.96
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def summarize(
    seeds: list[int],
    max_reward: np.ndarray,
    success: np.ndarray,
    final_cov: np.ndarray,
    steps: np.ndarray,
) -> dict[str, Any]:
    n = len(seeds)
    return {
        "mean_score": float(max_reward.mean()),
        "mean_score_ci95": _interval(max_reward),
        "success_rate": float(success.mean()),
        "success_rate_ci95": _wilson(int(success.sum()), n),
        "mean_final_coverage": float(final_cov.mean()),
        "mean_final_coverage_ci95": _interval(final_cov),
        "n_episodes": n,
        "per_seed": {
            str(s): {
                "max_reward": float(r),
                "success": bool(ok),
                "final_coverage": float(c),
                "steps": int(k),
            }
            for s, r, ok, c, k in zip(seeds, max_reward, success, final_cov, steps)
        },
    }


class Actor:
    """What evaluation needs from a policy: obs {key: (B, To, ...)} numpy -> actions (B, Ta, Da)."""

    def __init__(self, policy: torch.nn.Module, seed: int = 0):
        self.policy = policy
        self.n_obs_steps = policy.config.n_obs_steps
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = self.policy.predict_action_chunk(obs, generator=self.generator)
        return out["action"].float().cpu().numpy()


def evaluate(
    actor: Any,
    task: TaskConfig,
    cfg: EvalConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Roll out `actor` on seeds seed_start.. in waves of parallel envs; write metrics.json and videos."""
    out = Path(out_dir) if out_dir else None
    if out:
        (out / "videos").mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seed_start, cfg.seed_start + cfg.n_episodes))
    # One wave of all episodes keeps the policy batch large: sampling, not the env, dominates the cost.
    n_envs = min(cfg.n_envs or cfg.n_episodes, cfg.n_episodes)
    fn = partial(make_env, task.env_id, task.obs_type, cfg.max_steps, cfg.video_size)
    # Episodes end at different steps; NEXT_STEP autoreset lets a finished env be stepped along with the
    # rest (it resets, and its results are masked out) where DISABLED would refuse the whole batch.
    vector = (
        cfg.vector if cfg.vector != "auto" else ("async" if (os.cpu_count() or 1) >= 8 else "sync")
    )
    if vector == "async":
        venv: gym.vector.VectorEnv = AsyncVectorEnv(
            [fn] * n_envs,
            autoreset_mode=AutoresetMode.NEXT_STEP,
            context="spawn" if os.name != "posix" else None,
        )
    else:
        venv = SyncVectorEnv([fn] * n_envs, autoreset_mode=AutoresetMode.NEXT_STEP)
    results: dict[str, list] = {"max_reward": [], "success": [], "final_cov": [], "steps": []}
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.n_episodes, desc="eval", unit="ep", leave=False)
    try:
        for w in range(0, cfg.n_episodes, n_envs):
            wave = seeds[w : w + n_envs]
            paths = [
                str(out / "videos" / f"seed_{s}.mp4") if out and (w + i) < cfg.n_videos else None
                for i, s in enumerate(wave)
            ]
            r = _run_wave(
                venv,
                actor,
                task.obs_type,
                wave + [wave[-1]] * (n_envs - len(wave)),
                paths + [None] * (n_envs - len(wave)),
                cfg,
            )
            for k in results:
                results[k].extend(r[k][: len(wave)])
            if bar:
                bar.update(len(wave))
    finally:
        if bar:
            bar.close()
        try:
            venv.close()
        except Exception:
            pass
    metrics = summarize(
        seeds, *(np.asarray(results[k]) for k in ("max_reward", "success", "final_cov", "steps"))
    )
    metrics["wall_time_s"] = round(time.time() - t0, 2)
    metrics["seed_start"] = cfg.seed_start
    if out:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _run_wave(
    venv: gym.vector.VectorEnv,
    actor: Any,
    obs_key: str,
    seeds: list[int],
    video_paths: list[str | None],
    cfg: EvalConfig,
) -> dict[str, list]:
    n = len(seeds)
    venv.set_attr("video_path", video_paths)
    obs, info = _call(venv, "reset", cfg, seed=seeds)
    history = ObsHistory(actor.n_obs_steps, time_axis=1)
    history.reset(as_obs_dict(obs, obs_key))
    done = np.zeros(n, bool)
    max_reward = np.zeros(n)
    success = np.zeros(n, bool)
    final_cov = np.asarray(info["coverage"], dtype=float).copy()
    steps = np.zeros(n, int)
    while not done.all():
        actions = actor(history.stacked())  # (B, Ta, Da)
        for k in range(actions.shape[1]):
            obs, reward, terminated, truncated, info = _call(venv, "step", cfg, actions[:, k])
            live = ~done
            max_reward[live] = np.maximum(max_reward[live], reward[live])
            cov = np.asarray(info["coverage"], dtype=float)
            success[live] |= cov[live] > 0.95
            final_cov[live] = cov[live]
            steps[live] += 1
            done |= terminated | truncated
            history.push(as_obs_dict(obs, obs_key))
            if done.all():
                break
    return {
        "max_reward": list(max_reward),
        "success": list(success),
        "final_cov": list(final_cov),
        "steps": list(steps),
    }


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
            f"an env worker did not answer {method} within {cfg.worker_timeout_s} s (crashed or hung)"
        ) from None
    except (EOFError, BrokenPipeError, ConnectionResetError) as e:
        raise EvalError(f"an env worker died during {method}: {type(e).__name__}: {e}") from None
    except UserError:
        raise
    except Exception as e:
        raise EvalError(f"an env worker failed during {method}: {type(e).__name__}: {e}") from None


def check_server(meta: dict[str, Any], cfg: Any, checkpoint: str) -> None:
    """Refuse a server whose policy is not this checkpoint (its weights' sha256 in the metadata),
    or observes something else than this checkpoint's task, naming both."""
    from diffusion_policy.checkpoint import resolve_checkpoint
    from diffusion_policy.serving.protocol import checkpoint_digest

    if meta.get("task", {}).get("obs_type") != cfg.task.obs_type:
        raise UserError(
            f"the server's policy observes {meta.get('task', {}).get('obs_type')!r}, but {checkpoint} "
            f"is a {cfg.task.obs_type!r} checkpoint"
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
