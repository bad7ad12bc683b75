"""`dp sim`: replay recorded Push-T demonstrations in our simulator, render them to video, or play by hand.

    dp sim replay STORE [--episodes 0 5 10-20]   replay recorded actions, report block drift per episode
    dp sim render STORE --episode I --out x.mp4  render an episode's recorded states (with the action cross)
    dp sim play [--seed S]                       push the T with the mouse (R: reset, Q: quit)

Replay is the fidelity check of the simulator: starting from each episode's first recorded state, the
recorded actions must reproduce the recorded block trajectory (within 1 px in 205 of the 206 episodes).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.errors import DataError, UserError

TELEOP_RADIUS = 30.0  # px: the agent follows the mouse only once the mouse has come this close (as the original)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the replay, render and play subcommands."""
    sub = parser.add_subparsers(dest="sim_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("replay", help="replay recorded actions and report per-episode block drift")
    p.add_argument("store", type=Path, help="Push-T zarr store (e.g. pusht_cchi_v7_replay.zarr)")
    p.add_argument(
        "--episodes",
        nargs="+",
        default=None,
        metavar="I",
        help="episode indices or ranges such as 3 7 10-20 (default: all)",
    )
    p.add_argument("--tolerance", type=float, default=1.0, help="drift (px) counted as reproduced")

    p = sub.add_parser("render", help="render an episode's recorded states to a video")
    p.add_argument("store", type=Path, help="Push-T zarr store")
    p.add_argument("--episode", type=int, required=True, help="episode index")
    p.add_argument("--out", type=Path, required=True, help="output video (.mp4 or .gif)")
    p.add_argument(
        "--size", type=int, default=96, help="frame side in px (default 96, as the dataset)"
    )
    p.add_argument(
        "--fps", type=int, default=10, help="frames per second (default 10, the control rate)"
    )

    p = sub.add_parser(
        "play", help="play Push-T with the mouse in a pygame window (R resets, Q quits)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the first episode (then +1 per episode)"
    )
    p.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)  # for smoke tests


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen subcommand."""
    if args.sim_command == "replay":
        return replay(args.store, args.episodes, args.tolerance)
    if args.sim_command == "render":
        return render(args.store, args.episode, args.out, args.size, args.fps)
    return play(args.seed, args.max_steps)


# ---------------------------------------------------------------------------------------------- store access
def load_store(path: Path, keys: tuple[str, ...] = ("state", "action")) -> dict[str, np.ndarray]:
    """Read `data/<key>` and `meta/episode_ends` of a replay-buffer zarr store into numpy (read-only)."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise DataError(f"no Push-T store at {path}")
    try:
        if path.is_file() and path.suffix == ".zip":
            group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
        else:
            group = zarr.open_group(str(path), mode="r")
    except Exception as e:  # zarr raises several types for a non-store path
        raise DataError(f"{path} is not a zarr store: {e}") from e
    out: dict[str, np.ndarray] = {}
    for key in ("meta/episode_ends", *(f"data/{k}" for k in keys)):
        try:
            out[key.split("/")[1]] = np.asarray(group[key][:])
        except KeyError:
            raise DataError(
                f"{path} has no array {key!r} (expected a Push-T replay buffer)"
            ) from None
    ends = out["episode_ends"].astype(np.int64)
    if ends.ndim != 1 or len(ends) == 0 or np.any(np.diff(ends) <= 0) or ends[0] <= 0:
        raise DataError(
            f"{path}: meta/episode_ends must be increasing positive indices, got {ends[:5]}..."
        )
    for k in keys:
        if len(out[k]) != ends[-1]:
            raise DataError(
                f"{path}: data/{k} has {len(out[k])} rows but meta/episode_ends ends at {ends[-1]}"
            )
    out["episode_ends"] = ends
    return out


def _episode_slice(ends: np.ndarray, episode: int) -> slice:
    if not 0 <= episode < len(ends):
        raise UserError(
            f"episode {episode} out of range: the store has {len(ends)} episodes (0..{len(ends) - 1})"
        )
    start = 0 if episode == 0 else int(ends[episode - 1])
    return slice(start, int(ends[episode]))


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
            if not 0 <= i < n_episodes:
                raise UserError(
                    f"episode {i} out of range: the store has {n_episodes} episodes (0..{n_episodes - 1})"
                )
            out.add(i)
    return sorted(out)


# ---------------------------------------------------------------------------------------------- replay
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


def replay(store: Path, episodes: list[str] | None, tolerance: float = 1.0) -> int:
    """Replay the chosen episodes and print per-episode drift plus a summary."""
    from envs.pusht import PushTEnv

    data = load_store(store)
    ends = data["episode_ends"]
    chosen = parse_episodes(episodes, len(ends))
    states = data["state"].astype(np.float64)
    actions = data["action"].astype(np.float64)
    env = PushTEnv(obs_type="state")
    drifts = []
    t0 = time.perf_counter()
    print(f"{'episode':>7} {'steps':>5} {'max drift px':>13}")
    for i in chosen:
        sl = _episode_slice(ends, i)
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


# ---------------------------------------------------------------------------------------------- render
def render(store: Path, episode: int, out: Path, size: int = 96, fps: int = 10) -> int:
    """Render every recorded state of one episode, with the recorded action's red cross, to a video."""
    from diffusion_policy.video import write_video
    from envs.pusht import PushTEnv

    if size < 8:
        raise UserError(f"--size must be at least 8 px, got {size}")
    data = load_store(store)
    sl = _episode_slice(data["episode_ends"], episode)
    states = data["state"][sl].astype(np.float64)
    actions = data["action"][sl].astype(np.float64)
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


# ---------------------------------------------------------------------------------------------- play
def play(seed: int = 0, max_steps: int = 0) -> int:
    """Push the T with the mouse: the agent follows the mouse once it has come within 30 px of the agent."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    from envs.pusht import PushTEnv

    env = PushTEnv(obs_type="state", render_mode="human")
    env.reset(seed=seed)
    print(f"seed {seed}: move the mouse onto the blue disc to take control; R resets, Q quits")
    active, frames, ret = False, 0, 0
    try:
        while max_steps <= 0 or frames < max_steps:
            frames += 1
            restart = False
            for event in pygame.event.get():
                if event.type == pygame.QUIT or (
                    event.type == pygame.KEYDOWN and event.key in (pygame.K_q, pygame.K_ESCAPE)
                ):
                    return ret
                if event.type == pygame.KEYDOWN and event.key == pygame.K_r:
                    restart = True
            if restart:
                seed += 1
                env.reset(seed=seed)
                active = False
                print(f"reset: seed {seed}")
                continue
            mouse = np.array(pygame.mouse.get_pos(), dtype=np.float64)
            if not active:
                agent = np.array(tuple(env.agent.position))
                active = bool(np.linalg.norm(mouse - agent) < TELEOP_RADIUS)
            if not active:
                env.render()  # idle: no physics, just keep the window alive at 10 Hz
                continue
            _, reward, terminated, _, info = env.step(mouse)
            if terminated:
                print(
                    f"seed {seed}: success (coverage {info['coverage']:.3f}); next seed {seed + 1}"
                )
                seed += 1
                env.reset(seed=seed)
                active = False
    finally:
        env.close()
    return ret
