"""`dp data generate pusht`: demonstrations from the scripted expert (envs/pusht_expert.py) in a new store.

Why: the main job (`make quickstart`) must train on a machine that cannot download the human demos, so
the expert is the offline data source. Episodes are written in the Push-T format (data/pusht_format.py)
one at a time, so a long run never holds more than one episode's frames.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusion_policy.data.pusht_format import frame, stack_episode
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.errors import DataError, UserError
from envs import MAX_EPISODE_STEPS
from envs.pusht_expert import ExpertConfig, PushTExpert

TEST_SEED_START = 100_000  # the paper's test seeds; demos default to seeds below them


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    max_reward: float
    n_steps: int
    seconds: float  # wall time
    cpu_seconds: float  # CPU time of the process that ran it (robust to a busy machine)
    # The store's keys, (L, ...) each; None unless recorded.
    data: dict[str, np.ndarray] | None = None


def run_episode(
    seed: int,
    config: ExpertConfig | None = None,
    record: bool = True,
    max_steps: int = MAX_EPISODE_STEPS,
) -> EpisodeResult:
    """Let the expert play env seed `seed` (legacy reset) until success or `max_steps` steps."""
    from envs.pusht import PushTEnv

    t0, c0 = time.perf_counter(), time.process_time()
    env = PushTEnv(obs_type="pixels_agent_pos" if record else "state")
    expert = PushTExpert(config, seed=seed)
    obs, info = env.reset(seed=seed)
    frames, actions = [], []
    max_reward, success, n = 0.0, False, 0
    while n < max_steps and not success:
        action = expert.act(info["pos_agent"], info["vel_agent"], info["block_pose"])
        if record:
            frames.append(frame(obs, info))
            actions.append(action)
        obs, reward, success, _, info = env.step(action)
        max_reward = max(max_reward, float(reward))
        n += 1
    env.close()
    data = stack_episode(frames, actions) if record else None
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return EpisodeResult(seed, bool(success), max_reward, n, wall, cpu, data)


def _run_seed(args: tuple[int, ExpertConfig | None, bool, int]) -> EpisodeResult:
    seed, config, record, max_steps = args
    return run_episode(seed, config, record, max_steps)


@dataclass
class GenerateSummary:
    n_episodes: int
    n_success: int
    mean_max_reward: float
    mean_length: float
    n_kept: int
    n_steps_kept: int
    seconds: float  # wall time of the whole run
    cpu_seconds: float  # summed CPU time of the episodes

    @property
    def success_rate(self) -> float:
        return self.n_success / max(1, self.n_episodes)


def _episodes(jobs: list[tuple], workers: int) -> Iterator[EpisodeResult]:
    """Results in seed order, from this process or from spawned workers."""
    if workers == 1:
        yield from map(_run_seed, jobs)
        return
    import multiprocessing as mp

    # spawn, not fork: the caller may hold torch/OpenMP threads that a forked child would inherit.
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(_run_seed, jobs)


def _check_args(out: str | os.PathLike | None, n_episodes: int, seed_start: int, workers: int):
    if n_episodes < 1:
        raise UserError(f"--episodes must be at least 1, got {n_episodes}")
    if seed_start < 0:
        raise UserError(f"--seed-start must be >= 0, got {seed_start}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if out is not None and Path(out).exists():
        raise DataError(f"{out}: already exists; pick a new --out path or remove it first")


def generate(
    out: str | os.PathLike | None,
    n_episodes: int,
    seed_start: int = 0,
    workers: int = 1,
    keep_failures: bool = False,
    config: ExpertConfig | None = None,
    verbose: bool = True,
    max_steps: int = MAX_EPISODE_STEPS,
) -> GenerateSummary:
    """Run the expert on seeds seed_start .. seed_start + n_episodes - 1 and write a new store at `out`.

    Episodes end on success (coverage > 0.95) or after `max_steps`; failures are left out unless
    `keep_failures`. With `out=None` nothing is recorded (scoring only). Workers are spawned
    processes; every episode's randomness comes from its seed, so the result does not depend on them.
    The store is created at the first kept episode, so a run that keeps none leaves nothing behind.
    """
    _check_args(out, n_episodes, seed_start, workers)
    t0 = time.perf_counter()
    jobs = [
        (s, config, out is not None, max_steps) for s in range(seed_start, seed_start + n_episodes)
    ]
    buf, results, n_steps_kept = None, [], 0
    for res in _episodes(jobs, workers):
        results.append(res)
        keep = out is not None and (res.success or keep_failures)
        if keep:
            if buf is None:
                buf = ReplayBuffer.create(out)
            buf.add_episode(res.data)
            n_steps_kept += res.n_steps
        res.data = None  # written (or left out): keep only the numbers, not ~4 MB of frames each
        if verbose:
            _print_episode(res, len(results), n_episodes, left_out=out is not None and not keep)
    summary = GenerateSummary(
        n_episodes=n_episodes,
        n_success=sum(r.success for r in results),
        mean_max_reward=float(np.mean([r.max_reward for r in results])),
        mean_length=float(np.mean([r.n_steps for r in results])),
        n_kept=0 if buf is None else buf.n_episodes,
        n_steps_kept=n_steps_kept,
        seconds=time.perf_counter() - t0,
        cpu_seconds=float(sum(r.cpu_seconds for r in results)),
    )
    if verbose:
        _print_summary(summary, out, seed_start, workers)
    return summary


def _print_episode(res: EpisodeResult, i: int, n: int, left_out: bool) -> None:
    status = "success" if res.success else "failure"
    print(
        f"episode {i:>4}/{n}  seed {res.seed:>6}  {status}  steps {res.n_steps:>3}  "
        f"max reward {res.max_reward:.3f}  {res.seconds:.1f} s{'  (left out)' if left_out else ''}",
        flush=True,
    )


def _print_summary(
    s: GenerateSummary, out: str | os.PathLike | None, seed_start: int, workers: int
) -> None:
    n = s.n_episodes
    print(f"seeds            {seed_start}..{seed_start + n - 1}")
    print(f"success          {s.n_success}/{n} = {100 * s.success_rate:.1f}%")
    print(f"mean max reward  {s.mean_max_reward:.4f}")
    print(f"mean length      {s.mean_length:.1f} steps")
    print(
        f"wall time        {s.seconds:.1f} s ({s.seconds / n:.2f} s per episode, "
        f"{workers} worker{'s' if workers > 1 else ''}); CPU {s.cpu_seconds / n:.2f} s per episode"
    )
    if out is not None:
        print(f"stored           {s.n_kept} episodes, {s.n_steps_kept} steps -> {out}")
        if s.n_kept == 0:
            print("                 (no episode kept: the store was not created)")
    if seed_start + n > TEST_SEED_START:
        print(
            f"note             seeds >= {TEST_SEED_START} are the evaluation's test seeds: "
            "do not train on these demos"
        )
