"""Push the T with the mouse: the pick-up rule of the original's teleop, a display check, and `play`.

Like the original's demo_pusht.py, the agent follows the mouse only once the mouse has come within
TELEOP_RADIUS of it; before that nothing moves (and `dp data record` stores nothing). Input comes from
`pygame.event.get()`; tests inject scripted events through `events=`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

TELEOP_RADIUS = (
    30.0  # px: the agent follows the mouse once the mouse comes this close (as the original)
)
_HEADLESS_DRIVERS = ("dummy", "offscreen")

EventSource = Callable[[dict[str, Any]], list[Any]]


def picked_up(mouse: np.ndarray | None, agent_pos: np.ndarray) -> bool:
    """True once the mouse is within TELEOP_RADIUS of the agent (the moment teleop takes control)."""
    return mouse is not None and bool(np.linalg.norm(mouse - agent_pos) < TELEOP_RADIUS)


def display_problem() -> str | None:
    """Why no window can be shown here (None: one can). SDL silently falls back to an invisible
    offscreen window when there is no display, so a teleop loop would otherwise run forever unseen."""
    driver = os.environ.get("SDL_VIDEODRIVER", "").strip().lower()
    if driver in _HEADLESS_DRIVERS:
        return f"SDL_VIDEODRIVER={driver} opens no visible window"
    if sys.platform.startswith("linux") and driver not in ("kmsdrm", "fbcon", "directfb"):
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            return "no display: neither DISPLAY nor WAYLAND_DISPLAY is set (run it in a desktop session, or ssh -X)"
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    try:
        pygame.display.init()
    except pygame.error as e:
        return f"cannot open a display ({e})"
    if pygame.display.get_driver() in _HEADLESS_DRIVERS:
        return f"SDL chose its {pygame.display.get_driver()} video driver: no visible window"
    return None


def play(seed: int = 0, max_steps: int = 0, events: EventSource | None = None) -> int:
    """Push the T with the mouse in a pygame window; R resets to the next seed, Q or Esc quits.

    `max_steps` > 0 stops after that many frames; `events(info)` replaces `pygame.event.get()`.
    """
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    from envs.pusht import PushTEnv

    env = PushTEnv(obs_type="state", render_mode="human")
    _, info = env.reset(seed=seed)
    get_events = events or (lambda info: pygame.event.get())
    print(f"seed {seed}: move the mouse onto the blue disc to take control; R resets, Q quits")
    active, frames, mouse = False, 0, None
    try:
        while max_steps <= 0 or frames < max_steps:
            frames += 1
            restart = False
            for event in get_events(info):
                if event.type == pygame.QUIT or (
                    event.type == pygame.KEYDOWN and event.key in (pygame.K_q, pygame.K_ESCAPE)
                ):
                    return 0
                restart |= event.type == pygame.KEYDOWN and event.key == pygame.K_r
                if event.type == pygame.MOUSEMOTION:
                    mouse = np.array(event.pos, dtype=np.float64)
            if restart or info["is_success"]:
                if info["is_success"]:
                    print(f"seed {seed}: success (coverage {info['coverage']:.3f})")
                seed += 1
                _, info = env.reset(seed=seed)
                active = False
                print(f"reset: seed {seed}")
                continue
            active = active or picked_up(mouse, info["pos_agent"])
            if not active:
                env.render()  # idle: no physics, just keep the window alive at 10 Hz
                continue
            _, _, _, _, info = env.step(mouse)
    finally:
        env.close()
    return 0
