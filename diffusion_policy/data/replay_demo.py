"""Push-T demonstrations in the simulator (`dp sim`): replay a store's actions, render an episode, play.

Replay is the fidelity check of the simulator: starting from each episode's first recorded state, the
recorded actions must reproduce the recorded block trajectory (within 1 px in 205 of the 206 episodes).
Stores are read through `ReplayBuffer.load`, the checked reader: a missing or truncated chunk is one
clear error, never a replay of fill values. The env side (envs/) cannot import this package, so the
store-reading half lives here and the env and teleop loop stay in envs/.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.data import pusht_format
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.errors import UserError


def load_states_actions(store: str | Path) -> ReplayBuffer:
    """`state` and `action` of a Push-T store in RAM, checked (chunk files, values, the format)."""
    buf = ReplayBuffer.load(store, keys=["state", "action"])
    pusht_format.require(buf, ["state", "action"])
    return buf


def parse_episodes(specs: list[str] | None, n_episodes: int) -> list[int]:
    """Turn ['3', '7', '10-20'] into sorted unique indices, checked against the store's episode count."""
    if not specs:
        return list(range(n_episodes))
    out: set[int] = set()
    for spec in specs:
        try:
            if "-" in spec.strip("-"):
                lo, hi = (int(x) for x in spec.split("-", 1))
                chosen = range(lo, hi + 1)
            else:
                chosen = [int(spec)]
        except ValueError:
            raise UserError(f"bad episode {spec!r}: use indices or ranges like 3 7 10-20") from None
        for i in chosen:
            out.add(_check_episode(i, n_episodes))
    return sorted(out)


def _check_episode(i: int, n_episodes: int) -> int:
    if not 0 <= i < n_episodes:
        raise UserError(
            f"episode {i} out of range: the store has {n_episodes} episodes (0..{n_episodes - 1})"
        )
    return i


def replay_drift(env: Any, states: np.ndarray, actions: np.ndarray) -> float:
    """Max block-position drift (px) when replaying one episode's actions from its first recorded state.

    The action at row k was taken after observing state k, so state k + 1 is its result.
    """
    env.reset(options={"reset_to_state": states[0]})
    drift = 0.0
    for k in range(len(states) - 1):
        _, _, _, _, info = env.step(actions[k])
        drift = max(drift, float(np.abs(info["block_pose"][:2] - states[k + 1, 2:4]).max()))
    return drift


def replay(store: str | Path, episodes: list[str] | None, tolerance: float = 1.0) -> int:
    """Replay the chosen episodes and print per-episode drift plus a summary."""
    from envs.pusht import PushTEnv

    buf = load_states_actions(store)
    chosen = parse_episodes(episodes, buf.n_episodes)
    states, actions = buf["state"].astype(np.float64), buf["action"].astype(np.float64)
    env = PushTEnv(obs_type="state")
    drifts = []
    t0 = time.perf_counter()
    print(f"{'episode':>7} {'steps':>5} {'max drift px':>13}")
    for i in chosen:
        sl = buf.episode_slice(i)
        d = replay_drift(env, states[sl], actions[sl])
        drifts.append(d)
        flag = "" if d <= tolerance else "  <-- drifts"
        print(f"{i:>7} {sl.stop - sl.start:>5} {d:>13.6f}{flag}")
    env.close()
    d = np.array(drifts)
    print()
    print(f"{'episodes':<24}{len(d)}")
    print(f"{f'within {tolerance:g} px':<24}{int((d <= tolerance).sum())}")
    print(f"{'within 0.01 px':<24}{int((d <= 0.01).sum())}")
    print(f"{'median max drift px':<24}{np.median(d):.6f}")
    print(f"{'worst max drift px':<24}{d.max():.6f} (episode {chosen[int(np.argmax(d))]})")
    print(f"{'seconds':<24}{time.perf_counter() - t0:.1f}")
    return 0


def render(store: str | Path, episode: int, out: Path, size: int = 96, fps: int = 10) -> int:
    """Render every recorded state of one episode, with the recorded action's red cross, to a video."""
    from diffusion_policy.video import write_video
    from envs.pusht import PushTEnv

    if size < 8:
        raise UserError(f"--size must be at least 8 px, got {size}")
    buf = load_states_actions(store)
    sl = buf.episode_slice(_check_episode(episode, buf.n_episodes))
    states = buf["state"][sl].astype(np.float64)
    actions = buf["action"][sl].astype(np.float64)
    env = PushTEnv(obs_type="state", render_mode="rgb_array", render_size=size)

    def frames():
        for state, action in zip(states, actions):
            env.reset(options={"reset_to_state": state})
            env.latest_action = (
                action  # draw the cross where the demonstrator aimed from this state
            )
            yield env.render()

    path = write_video(out, frames(), fps=fps)
    env.close()
    print(f"wrote {len(states)} frames of episode {episode} to {path}")
    return 0


def play(seed: int = 0) -> int:
    """Teleoperate Push-T in a window (envs/pusht_teleop.py), refusing where no window can be seen."""
    from envs.pusht_teleop import display_problem
    from envs.pusht_teleop import play as play_env

    problem = display_problem()
    if problem:
        raise UserError(f"dp sim play needs a window to play in: {problem}")
    return play_env(seed)
