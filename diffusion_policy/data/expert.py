"""`dp data generate TASK`: demonstrations from a task's scripted demonstrator in a new store.

Why: the main job (`make quickstart`) must train on a machine that cannot download the human demos, so
the Push-T expert (envs/pusht_expert.py) is the offline data source; Block Pushing's data is made the
way the original's was, by its multimodal oracle (envs/block_pushing_oracle.py). Each task is one
`Demonstrator` line; the loop, workers, store writing and summary are shared. Episodes are written one
at a time, so a long run never holds more than one episode's frames.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.data.pusht_format import frame, stack_episode
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.errors import DataError, UserError
from envs import BLOCKPUSH_MAX_EPISODE_STEPS, MAX_EPISODE_STEPS
from envs.pusht_expert import ExpertConfig, PushTExpert

TEST_SEED_START = 100_000  # the paper's test seeds (both tasks); demos default to seeds below them


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
    mode: str | None = None  # multimodal tasks: what the episode did (the env's info["mode"])
    events: dict[str, bool] = field(default_factory=dict)  # named events reached (p1, p2)


@dataclass
class _Played:
    frames: list[Any]
    actions: list[np.ndarray]
    success: bool
    max_reward: float
    n_steps: int
    info: dict[str, Any]


def _play(
    env: Any, act: Callable, seed: int, record: bool, max_steps: int, to_frame: Callable
) -> _Played:
    """Reset `env` to `seed` and step `act(obs, info)` until success (termination) or `max_steps`."""
    obs, info = env.reset(seed=seed)
    played = _Played([], [], False, 0.0, 0, info)
    while played.n_steps < max_steps and not played.success:
        action = act(obs, info)
        if record:
            played.frames.append(to_frame(obs, info))
            played.actions.append(action)
        obs, reward, played.success, _, info = env.step(action)
        played.max_reward = max(played.max_reward, float(reward))
        played.n_steps += 1
    played.info = info
    env.close()
    return played


def run_episode(
    seed: int,
    config: ExpertConfig | None = None,
    record: bool = True,
    max_steps: int = MAX_EPISODE_STEPS,
) -> EpisodeResult:
    """Let the Push-T expert play env seed `seed` (legacy reset) until success or `max_steps` steps."""
    from envs.pusht import PushTEnv

    t0, c0 = time.perf_counter(), time.process_time()
    env = PushTEnv(obs_type="pixels_agent_pos" if record else "state")
    expert = PushTExpert(config, seed=seed)

    def act(obs: Any, info: dict[str, Any]) -> np.ndarray:
        return expert.act(info["pos_agent"], info["vel_agent"], info["block_pose"])

    p = _play(env, act, seed, record, max_steps, frame)
    data = stack_episode(p.frames, p.actions) if record else None
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return EpisodeResult(seed, bool(p.success), p.max_reward, p.n_steps, wall, cpu, data)


def run_blockpush_episode(
    seed: int,
    config: None = None,
    record: bool = True,
    max_steps: int = BLOCKPUSH_MAX_EPISODE_STEPS,
) -> EpisodeResult:
    """Let the multimodal oracle play Block Pushing seed `seed` (its plan drawn from the seed).

    Stores `obs` (the 16-d state before each step, float32) and `action` (the effector's move,
    float32), as the original's multimodal_push_seed store; success is p2 (both blocks in zones).
    """
    from envs.block_pushing import BlockPushMultimodalEnv
    from envs.block_pushing_oracle import MultimodalPushOracle

    if config is not None:
        raise UserError("the Block Pushing oracle takes no expert config")
    t0, c0 = time.perf_counter(), time.process_time()
    oracle = MultimodalPushOracle(seed=seed)
    p = _play(BlockPushMultimodalEnv(), lambda obs, info: oracle.act(obs), seed, record, max_steps, lambda obs, info: obs)  # fmt: skip
    data = None
    if record:
        data = {
            "obs": np.asarray(p.frames, np.float32),
            "action": np.asarray(p.actions, np.float32),
        }
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    events = {k: bool(p.info[k]) for k in ("p1", "p2")}
    return EpisodeResult(seed, bool(p.success), p.max_reward, p.n_steps, wall, cpu, data, p.info["mode"], events)  # fmt: skip


@dataclass(frozen=True)
class Demonstrator:
    """A task's scripted demonstrations: its episode runner and its episode cap."""

    run: Callable[..., EpisodeResult]  # (seed, config, record, max_steps) -> EpisodeResult
    max_steps: int


DEMONSTRATORS: dict[str, Demonstrator] = {
    "pusht": Demonstrator(run_episode, MAX_EPISODE_STEPS),
    "blockpush": Demonstrator(run_blockpush_episode, BLOCKPUSH_MAX_EPISODE_STEPS),
}


def _run_seed(args: tuple[str, int, ExpertConfig | None, bool, int]) -> EpisodeResult:
    task, seed, config, record, max_steps = args
    return DEMONSTRATORS[task].run(seed, config, record, max_steps)


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
    modes: dict[str, int] = field(default_factory=dict)  # multimodal tasks: kept episodes per mode
    event_rates: dict[str, float] = field(default_factory=dict)  # fraction of episodes per event

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
    max_steps: int | None = None,
    task: str = "pusht",
) -> GenerateSummary:
    """Run `task`'s demonstrator on seeds seed_start .. seed_start + n_episodes - 1 into a new store.

    Episodes end on success (Push-T: coverage > 0.95; Block Pushing: both blocks in different zones)
    or after `max_steps` (default: the task's episode cap); failures are left out unless
    `keep_failures`. With `out=None` nothing is recorded (scoring only). Workers are spawned
    processes; every episode's randomness comes from its seed, so the result does not depend on them.
    The store is created at the first kept episode, so a run that keeps none leaves nothing behind.
    """
    if task not in DEMONSTRATORS:
        raise UserError(f"unknown task {task!r}; known: {', '.join(DEMONSTRATORS)}")
    _check_args(out, n_episodes, seed_start, workers)
    t0 = time.perf_counter()
    cap = DEMONSTRATORS[task].max_steps if max_steps is None else max_steps
    seeds = range(seed_start, seed_start + n_episodes)
    jobs = [(task, s, config, out is not None, cap) for s in seeds]
    modes: Counter[str] = Counter()
    buf, results, n_steps_kept = None, [], 0
    for res in _episodes(jobs, workers):
        results.append(res)
        keep = out is not None and (res.success or keep_failures)
        if keep:
            if buf is None:
                buf = ReplayBuffer.create(out)
            buf.add_episode(res.data)
            n_steps_kept += res.n_steps
            if res.mode is not None:
                modes[res.mode] += 1
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
        modes=dict(sorted(modes.items())),
        event_rates={
            k: float(np.mean([r.events.get(k, False) for r in results]))
            for k in dict.fromkeys(k for r in results for k in r.events)
        },
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
    for name, rate in s.event_rates.items():
        print(f"{name:<16} {rate:.3f} of the episodes")
    if s.modes:
        print(
            f"modes            of the {s.n_kept} kept episodes (block -> zone, in the order reached):"
        )
        for mode, count in s.modes.items():
            print(f"  {mode:<34} {count:>5}  {count / max(1, s.n_kept):.3f}")
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
