"""`dp data record pusht`: teleoperate Push-T with the mouse and append the episodes to a zarr store.

Like the original's demo_pusht.py: the agent follows the mouse once the mouse has come within 30 px of
it (no step is recorded before that); every 10 Hz step stores the observation BEFORE the action with
that action (the mouse position), in the same keys as the human set and `dp data generate`.

Keys: Space or Enter ends and saves the episode (success saves it automatically); R discards it and
retries the same seed; Q, Esc or closing the window quits, discarding the unfinished episode.

The next episode's seed is --seed-start (default: the store's episode count, as the original) and
advances by one per saved episode. Input comes from `pygame.event.get()`; tests inject a scripted
operator through `record(..., events=...)`, which sees the env info and returns pygame events.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.data.expert import STORE_KEYS, frame, stack_episode
from diffusion_policy.errors import DataError, UserError

TELEOP_RADIUS = (
    30.0  # px: the agent follows the mouse once the mouse comes this close (as the original)
)

EventSource = Callable[[dict[str, Any]], list[Any]]


@dataclass
class RecordSummary:
    saved: list[tuple[int, int, bool]] = field(default_factory=list)  # (seed, steps, success) each
    n_episodes_in_store: int = 0


def _open_store(path: Path) -> Any:
    """The existing store to append to (keys checked up front, before anyone records), or None."""
    from diffusion_policy.data.replay_buffer import ReplayBuffer

    if not path.exists():
        return None  # created on the first save, so quitting early leaves no empty store behind
    buf = ReplayBuffer.open(path, mode="a")
    if buf.keys() and set(buf.keys()) != set(STORE_KEYS):
        raise DataError(
            f"{path}: holds keys {sorted(buf.keys())}, but Push-T recording writes {sorted(STORE_KEYS)}"
        )
    return buf


def _save(buf: Any, path: Path, episode: dict[str, np.ndarray]) -> Any:
    """Append (creating the store if needed), casting losslessly to the store's dtypes.

    The human set keeps img as float32 0..255, so recording into a copy of it stays consistent.
    """
    from diffusion_policy.data.replay_buffer import ReplayBuffer

    if buf is None:
        buf = ReplayBuffer.create(path)
    for k, v in episode.items():
        if k in buf.keys():
            dtype = np.dtype(buf[k].dtype)
            if dtype != v.dtype and np.can_cast(v.dtype, dtype, "safe"):
                episode[k] = v.astype(dtype)
    buf.add_episode(episode)
    return buf


def record(
    out: str | os.PathLike,
    seed_start: int | None = None,
    *,
    events: EventSource | None = None,
    fps: float = 10.0,
) -> RecordSummary:
    """Run the teleop loop until the operator quits; returns what was saved.

    `events(info)` replaces `pygame.event.get()` (the operator sees the current env info); `fps=0`
    runs as fast as the events come (tests).
    """
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    from envs.pusht import WINDOW_SIZE, PushTEnv

    if seed_start is not None and seed_start < 0:
        raise UserError(f"--seed-start must be >= 0, got {seed_start}")
    path = Path(out)
    buf = _open_store(path)
    n_stored = 0 if buf is None else buf.n_episodes
    seed = n_stored if seed_start is None else int(seed_start)
    try:
        pygame.display.init()
        screen = pygame.display.set_mode((WINDOW_SIZE, WINDOW_SIZE))
    except pygame.error as e:
        raise UserError(
            f"cannot open a window ({e}); record needs a display (SDL_VIDEODRIVER=dummy runs headless)"
        ) from e
    clock = pygame.time.Clock()
    # Observations are the 96 px image (no action cross) + agent xy; the window shows a 512 px render.
    env = PushTEnv(obs_type="pixels_agent_pos", render_mode="rgb_array", render_size=WINDOW_SIZE)
    summary = RecordSummary()
    get_events = events or (lambda info: pygame.event.get())

    def start() -> tuple[Any, dict, list, list]:
        obs, info = env.reset(seed=seed)
        pygame.display.set_caption(f"Push-T record: seed {seed}, {n_stored} episodes in store")
        return obs, info, [], []

    def save(success: bool) -> None:
        nonlocal seed, buf, n_stored
        buf = _save(buf, path, stack_episode(frames, actions))
        n_stored = buf.n_episodes
        summary.saved.append((seed, len(actions), success))
        how = "success" if success else "ended by operator"
        print(f"saved episode {n_stored - 1} (seed {seed}): {len(actions)} steps, {how}")
        seed += 1

    print(
        f"recording into {path} from seed {seed}: move the mouse onto the blue disc to take control; "
        "Space/Enter saves, R retries, Q quits"
    )
    obs, info, frames, actions = start()
    mouse: np.ndarray | None = None
    active = False
    try:
        while True:
            quit_, retry, done = False, False, False
            for ev in get_events(info):
                if ev.type == pygame.QUIT:
                    quit_ = True
                elif ev.type == pygame.KEYDOWN:
                    if ev.key in (pygame.K_q, pygame.K_ESCAPE):
                        quit_ = True
                    elif ev.key == pygame.K_r:
                        retry = True
                    elif ev.key in (pygame.K_SPACE, pygame.K_RETURN, pygame.K_KP_ENTER):
                        done = True
                elif ev.type == pygame.MOUSEMOTION:
                    mouse = np.array(ev.pos, dtype=np.float64)
            if quit_:
                if actions:
                    print(f"quit: discarded the unfinished episode ({len(actions)} steps)")
                break
            if retry or (done and actions):
                if done:
                    save(success=False)
                else:
                    print(f"retry: discarded {len(actions)} steps; seed {seed} again")
                obs, info, frames, actions = start()
                active = False
                continue
            if not active and mouse is not None:
                active = bool(np.linalg.norm(mouse - info["pos_agent"]) < TELEOP_RADIUS)
            if active:
                frames.append(frame(obs, info))
                actions.append(mouse.copy())
                obs, _, success, _, info = env.step(mouse)
                if success:
                    save(success=True)
                    obs, info, frames, actions = start()
                    active = False
            _draw(screen, env, info, None if active else TELEOP_RADIUS)
            if fps > 0:
                clock.tick(fps)
    finally:
        env.close()
        pygame.display.quit()
    summary.n_episodes_in_store = n_stored
    print(f"saved {len(summary.saved)} episode(s); {path} holds {n_stored}")
    return summary


def _draw(screen: Any, env: Any, info: dict[str, Any], ring: float | None) -> None:
    """The 512 px scene (with the action cross); while idle, a ring shows where to pick the agent up."""
    import pygame

    img = env.render()
    screen.blit(pygame.surfarray.make_surface(np.ascontiguousarray(img.swapaxes(0, 1))), (0, 0))
    if ring is not None:
        x, y = (int(v) for v in info["pos_agent"])
        pygame.draw.circle(screen, (255, 0, 0), (x, y), int(ring), 1)
    pygame.display.flip()
