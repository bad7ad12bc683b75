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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.data.pusht_format import STORE_KEYS, frame, stack_episode
from diffusion_policy.errors import DataError, UserError
from envs.pusht_teleop import TELEOP_RADIUS, EventSource, display_problem, picked_up


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


@dataclass
class _Keys:
    """What the operator asked for in one frame's events."""

    quit: bool = False
    retry: bool = False
    done: bool = False
    mouse: np.ndarray | None = None  # the latest mouse position, when it moved


def _read_keys(events: list[Any]) -> _Keys:
    import pygame

    keys = _Keys()
    for ev in events:
        if ev.type == pygame.QUIT:
            keys.quit = True
        elif ev.type == pygame.KEYDOWN:
            keys.quit |= ev.key in (pygame.K_q, pygame.K_ESCAPE)
            keys.retry |= ev.key == pygame.K_r
            keys.done |= ev.key in (pygame.K_SPACE, pygame.K_RETURN, pygame.K_KP_ENTER)
        elif ev.type == pygame.MOUSEMOTION:
            keys.mouse = np.array(ev.pos, dtype=np.float64)
    return keys


def _open_window(check_display: bool) -> Any:
    """The 512 px window; with a real operator, refuse when no one could see it."""
    import pygame

    from envs.pusht import WINDOW_SIZE

    problem = display_problem() if check_display else None
    if problem:
        raise UserError(f"dp data record needs a window to teleoperate in: {problem}")
    try:
        pygame.display.init()
        return pygame.display.set_mode((WINDOW_SIZE, WINDOW_SIZE))
    except pygame.error as e:
        raise UserError(f"cannot open a window ({e}); record needs a display") from e


class _Session:
    """One recording session: the env, the episode being recorded, and the store it is saved to."""

    def __init__(self, path: Path, seed_start: int | None) -> None:
        from envs.pusht import WINDOW_SIZE, PushTEnv

        if seed_start is not None and seed_start < 0:
            raise UserError(f"--seed-start must be >= 0, got {seed_start}")
        self.path, self.buf = path, _open_store(path)
        self.n_stored = 0 if self.buf is None else self.buf.n_episodes
        self.seed = self.n_stored if seed_start is None else int(seed_start)
        # Observations are the 96 px image (no action cross) + agent xy; the window shows a 512 px render.
        self.env = PushTEnv(
            obs_type="pixels_agent_pos", render_mode="rgb_array", render_size=WINDOW_SIZE
        )
        self.summary = RecordSummary()

    def start(self) -> None:
        import pygame

        self.obs, self.info = self.env.reset(seed=self.seed)
        self.frames, self.actions, self.active = [], [], False
        pygame.display.set_caption(
            f"Push-T record: seed {self.seed}, {self.n_stored} episodes in store"
        )

    def step(self, mouse: np.ndarray) -> None:
        self.frames.append(frame(self.obs, self.info))
        self.actions.append(mouse.copy())
        self.obs, _, success, _, self.info = self.env.step(mouse)
        if success:
            self.save(success=True)

    def save(self, success: bool) -> None:
        self.buf = _save(self.buf, self.path, stack_episode(self.frames, self.actions))
        self.n_stored = self.buf.n_episodes
        self.summary.saved.append((self.seed, len(self.actions), success))
        how = "success" if success else "ended by operator"
        print(
            f"saved episode {self.n_stored - 1} (seed {self.seed}): {len(self.actions)} steps, {how}"
        )
        self.seed += 1
        self.start()


def record(
    out: str | os.PathLike,
    seed_start: int | None = None,
    *,
    events: EventSource | None = None,
    fps: float = 10.0,
) -> RecordSummary:
    """Run the teleop loop until the operator quits; returns what was saved.

    `events(info)` replaces `pygame.event.get()` (the operator sees the current env info) and skips
    the display check; `fps=0` runs as fast as the events come (tests).
    """
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    session = _Session(Path(out), seed_start)
    screen = _open_window(check_display=events is None)
    clock = pygame.time.Clock()
    get_events = events or (lambda info: pygame.event.get())
    print(
        f"recording into {session.path} from seed {session.seed}: move the mouse onto the blue disc "
        "to take control; Space/Enter saves, R retries, Q quits"
    )
    session.start()
    mouse = None
    try:
        while True:
            keys = _read_keys(get_events(session.info))
            mouse = mouse if keys.mouse is None else keys.mouse
            if keys.quit:
                if session.actions:
                    print(f"quit: discarded the unfinished episode ({len(session.actions)} steps)")
                break
            if keys.done and session.actions:
                session.save(success=False)
                continue
            if keys.retry:
                print(f"retry: discarded {len(session.actions)} steps; seed {session.seed} again")
                session.start()
                continue
            session.active = session.active or picked_up(mouse, session.info["pos_agent"])
            if session.active:
                session.step(mouse)
            _draw(screen, session.env, session.info, None if session.active else TELEOP_RADIUS)
            if fps > 0:
                clock.tick(fps)
    finally:
        session.env.close()
        pygame.display.quit()
    session.summary.n_episodes_in_store = session.n_stored
    print(f"saved {len(session.summary.saved)} episode(s); {session.path} holds {session.n_stored}")
    return session.summary


def _draw(screen: Any, env: Any, info: dict[str, Any], ring: float | None) -> None:
    """The 512 px scene (with the action cross); while idle, a ring shows where to pick the agent up."""
    import pygame

    img = env.render()
    screen.blit(pygame.surfarray.make_surface(np.ascontiguousarray(img.swapaxes(0, 1))), (0, 0))
    if ring is not None:
        x, y = (int(v) for v in info["pos_agent"])
        pygame.draw.circle(screen, (255, 0, 0), (x, y), int(ring), 1)
    pygame.display.flip()
