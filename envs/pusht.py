"""Push-T: push a T-shaped block onto a fixed goal pose with a circular, position-controlled agent.

A faithful re-implementation of the original Diffusion Policy Push-T simulation (physics, controller,
legacy seeding, rendering and reward; see /work/shared/PUSHT_SPEC.md section 1) on pymunk 7 and the
gymnasium API. Nothing here imports `diffusion_policy`: envs are a leaf package.
"""

from __future__ import annotations

import math
import os
from typing import Any

import cv2
import gymnasium as gym
import numpy as np
import pymunk
import shapely
from gymnasium import spaces

from envs.actions import check_xy_action

# ----------------------------------------------------------------------------------------------------
# Constants (spec section 1). Units are pixels; y points down; positive angles look clockwise.
# ----------------------------------------------------------------------------------------------------
WINDOW_SIZE = 512
SIM_HZ = 100
CONTROL_HZ = 10
N_SUBSTEPS = SIM_HZ // CONTROL_HZ  # 10 physics steps of 0.01 s per env step
DT = 1.0 / SIM_HZ
K_P, K_V = 100.0, 20.0  # critically damped PD tracker (omega_n = 10 rad/s, zeta = 1)
SUCCESS_THRESHOLD = 0.95
GOAL_POSE = (256.0, 256.0, math.pi / 4)
AGENT_RADIUS = 15.0
BLOCK_MASS = 1.0
# The original sums two polygon moments but passes the crossbar vertices twice: 2 x 1500 about the origin.
BLOCK_MOMENT = 3000.0
WALL_RADIUS = 2.0
WALLS = (((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506)))
# T block in body-local coordinates; the origin is the midpoint of the crossbar's outer edge.
CROSSBAR = ((-60.0, 30.0), (60.0, 30.0), (60.0, 0.0), (-60.0, 0.0))
STEM = ((-15.0, 30.0), (-15.0, 120.0), (15.0, 120.0), (15.0, 30.0))
BLOCK_AREA = 6300.0
_BLOCK_LOCAL_VERTS = (CROSSBAR, STEM)
# Every block point is within hypot(60, 120) of its origin; two blocks whose origins are further apart than
# twice that cannot overlap.
_NO_OVERLAP_DIST = 2 * math.hypot(60.0, 120.0) + 1.0

# Colours (pygame named colours used by the original).
LIGHT_GRAY = (211, 211, 211, 255)  # walls
ROYAL_BLUE = (65, 105, 225, 255)  # agent
LIGHT_SLATE_GRAY = (119, 136, 153, 255)  # block
LIGHT_GREEN = (144, 238, 144, 255)  # goal

# The 9 block keypoints in body-local coordinates. Derived from the published demonstrations
# (pusht_cchi_v7_replay.zarr): every row satisfies keypoint = R(angle) @ local + block_xy, so we inverted that
# transform on all 25650 rows, dropped the 118 rows (runs right after a hard push) whose keypoints disagree
# with their own recorded state by more than 0.1 px, and averaged the rest (max residual 0.095 px, median
# 0.0004 px). The original drew these with farthest-point sampling on a pygame rasterisation (spec 1.10).
BLOCK_KEYPOINTS_LOCAL = np.array(
    [
        (9.26974644323399, 90.04105785951424),
        (-60.983446300454624, -1.1866961383687322),
        (60.91278146178566, -1.3932425694689532),
        (-0.2704970508463165, 25.54370247575287),
        (-14.06499124369957, 122.81592092524228),
        (39.00273934273851, 32.85750991523675),
        (-39.96641321139026, 32.729704196561585),
        (-16.824364860030737, 62.8632444603776),
        (23.541487195090042, -1.700193397263442),
    ],
    dtype=np.float64,
)

OBS_TYPES = ("state", "keypoints", "pixels", "pixels_agent_pos")

try:  # Counting contacts is the hottest callback; read Chipmunk's count directly when pymunk exposes it.
    from pymunk._chipmunk_cffi import lib as _chipmunk

    def _contact_count(arbiter: pymunk.Arbiter) -> int:
        return _chipmunk.cpArbiterGetCount(arbiter._arbiter)

    for _name in ("cpBodyGetPosition", "cpBodyGetVelocity", "cpBodySetVelocity", "cpSpaceStep"):
        getattr(_chipmunk, _name)
except (ImportError, AttributeError):  # pragma: no cover - other pymunk builds
    _chipmunk = None

    def _contact_count(arbiter: pymunk.Arbiter) -> int:
        return len(arbiter.contact_point_set.points)


def rotation(theta: float) -> np.ndarray:
    """The 2 x 2 rotation by `theta` (positive angles look clockwise, as y points down)."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def to_world(pose: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Block-local points (..., 2) to world pixels for a block pose [x, y, angle]: R(angle) p + xy."""
    return local @ rotation(pose[2]).T + pose[:2]


def _pd_velocity(
    tx: float, ty: float, px: float, py: float, vx: float, vy: float
) -> tuple[float, float]:
    """The PD law, with the original's float operations in its order: a = k_p (t - p) + k_v (0 - v); v + a dt."""
    return (
        vx + (K_P * (tx - px) + K_V * (0.0 - vx)) * DT,
        vy + (K_P * (ty - py) + K_V * (0.0 - vy)) * DT,
    )


def track_target(space: pymunk.Space, agent: pymunk.Body, tx: float, ty: float) -> None:
    """One env step of the agent's PD tracker toward (tx, ty): N_SUBSTEPS physics steps of DT.

    The only copy of the control law: the env and the scripted expert's planning sim both step with it.
    With pymunk's cffi handle it calls Chipmunk directly (the hot loop of every step); that equals
    `body.velocity = ...; space.step(dt)` for this space (nothing is added or removed during a step)
    without the Python wrappers' overhead. The replay test pins the result.
    """
    if (
        _chipmunk is None
    ):  # pragma: no cover - public-API path for pymunk builds without the cffi handle
        for _ in range(N_SUBSTEPS):
            agent.velocity = _pd_velocity(tx, ty, *agent.position, *agent.velocity)
            space.step(DT)
        return
    body, space_ptr = agent._body, space._space
    get_p, get_v = _chipmunk.cpBodyGetPosition, _chipmunk.cpBodyGetVelocity
    set_v, space_step = _chipmunk.cpBodySetVelocity, _chipmunk.cpSpaceStep
    space._locked = True
    try:
        for _ in range(N_SUBSTEPS):
            p, v = get_p(body), get_v(body)
            set_v(body, _pd_velocity(tx, ty, p.x, p.y, v.x, v.y))
            space_step(space_ptr, DT)
    finally:
        space._locked = False


def _light(color: tuple[int, ...]) -> tuple[int, ...]:
    """The original's fill colour: RGBA times 1.2, clipped at 255, rounded."""
    return tuple(int(round(min(255.0, 1.2 * c))) for c in color)


def _make_draw_options(surface: Any) -> Any:
    """pymunk's pygame DrawOptions with the original's look: two-tone discs, light polygons with 2 px edges.

    Segments (the walls) and collision points keep pymunk's own pygame routines, as in the original.
    Built lazily so that importing this module never imports pygame.
    """
    import pygame
    from pymunk.pygame_util import DrawOptions, to_pygame

    class _PushTDrawOptions(DrawOptions):
        def draw_circle(self, pos, angle, radius, outline_color, fill_color) -> None:  # noqa: ANN001
            p = to_pygame(pos, self.surface)
            pygame.draw.circle(self.surface, fill_color.as_int(), p, round(radius), 0)
            inner = _light(fill_color.as_int())
            pygame.draw.circle(self.surface, inner, p, round(radius - 4), 0)

        def draw_polygon(self, verts, radius, outline_color, fill_color) -> None:  # noqa: ANN001
            ps = [to_pygame(v, self.surface) for v in verts]
            ps += [ps[0]]
            pygame.draw.polygon(self.surface, _light(fill_color.as_int()), ps)
            for i in range(len(verts)):
                DrawOptions.draw_fat_segment(
                    self, verts[i], verts[(i + 1) % len(verts)], 2, fill_color, fill_color
                )

    return _PushTDrawOptions(surface)


class PushTEnv(gym.Env):
    """Push a T-shaped block onto a fixed target pose with a circular agent (the Diffusion Policy Push-T task).

    ## Description
    A 512 x 512 px top-down table with walls. A kinematic disc (radius 15) tracks a target position through a
    critically damped PD controller (k_p = 100, k_v = 20, 10 substeps of 0.01 s per 10 Hz env step) and pushes
    a frictionless, quasi-static (space damping 0) T block (mass 1, moment 3000, centre of gravity (0, 45)).
    Faithful to the original simulation, including its quirks, so the published demonstrations replay exactly.
    Coordinates are pixels with y pointing down, so positive angles look clockwise.

    ## Action Space
    `Box(0, 512, (2,), float64)`: the target position of the agent. Values are not clipped (as in the
    original). Wrong shapes and NaN/Inf raise `ValueError`.

    ## Observation Space
    Chosen with `obs_type`:
    * `"state"`: float64 (5,) = [agent_x, agent_y, block_x, block_y, block_angle mod 2 pi]. The block position is
      its body origin (midpoint of the crossbar's top edge), not its centre of gravity.
    * `"keypoints"`: float64 (20,) = the 9 block keypoints (x0, y0, ..., x8, y8) in world pixels, then agent x, y.
      The original appended a 20-entry visibility mask (always 1); it is dropped here.
    * `"pixels"`: uint8 (S, S, 3) HWC RGB with S = `observation_size`, without the action marker.
    * `"pixels_agent_pos"`: Dict(`pixels`: as above, `agent_pos`: float64 (2,)).

    ## Rewards
    coverage = area(block ∩ goal) / area(goal) computed with shapely; reward = clip(coverage / 0.95, 0, 1).

    ## Starting State
    `reset(seed=s)` draws [agent_x, agent_y] ~ randint(50, 450), [block_x, block_y] ~ randint(100, 400) and
    angle ~ randn() * 2 pi - pi with the legacy `np.random.RandomState(s)`, exactly as the original, so seed s is
    the original's initial condition s (the paper's test set is seeds 100000..100049). With `legacy=True`
    (default, what the original's evaluation used) the block position is set before the angle, so the origin
    ends at the sample + (45 sin a, 45 (1 - cos a)). One 0.01 s physics step then resolves overlaps.
    `reset(options={"reset_to_state": [ax, ay, bx, by, angle]})` sets that exact state (angle first, then
    position, then one 0.01 s physics step), which is how the recorded demonstrations replay.

    ## Episode End
    Terminated when coverage > 0.95. No truncation of its own: `gymnasium.make("PushT-v0")` adds a 300-step limit.

    ## Arguments
    * `obs_type`: one of "state", "keypoints", "pixels", "pixels_agent_pos".
    * `render_mode`: None, "rgb_array" (`render()` returns the frame with a red cross at the last action, as the
      original's videos) or "human" (a pygame window at 10 Hz).
    * `observation_size`: side of image observations (default 96).
    * `render_size`: side of `render()` frames (default 96).
    * `block_cog`: optional body-local centre of gravity for the block (default (0, 45)).
    * `damping`: optional space damping (default 0: the block stops as soon as nothing pushes it).
    * `legacy`: position-then-angle ordering for seeded resets (default True, as the original's evaluation).

    `info` (from reset and step): `coverage`, `is_success`, `pos_agent`, `vel_agent`, `block_pose`
    ([x, y, raw unwrapped angle]), `goal_pose`, `n_contacts` (ceil(contact points over the step / 10)).
    """

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        obs_type: str = "state",
        render_mode: str | None = None,
        observation_size: int = 96,
        render_size: int = 96,
        block_cog: tuple[float, float] | None = None,
        damping: float | None = None,
        legacy: bool = True,
    ) -> None:
        if obs_type not in OBS_TYPES:
            raise ValueError(
                f"unknown obs_type {obs_type!r}; expected one of {', '.join(OBS_TYPES)}"
            )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"unknown render_mode {render_mode!r}; expected None or one of {self.metadata['render_modes']}"
            )
        for name, size in (("observation_size", observation_size), ("render_size", render_size)):
            if int(size) != size or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        self.obs_type = obs_type
        self.render_mode = render_mode
        self.observation_size = int(observation_size)
        self.render_size = int(render_size)
        self.block_cog = None if block_cog is None else (float(block_cog[0]), float(block_cog[1]))
        self.damping = None if damping is None else float(damping)
        self.legacy = bool(legacy)

        self.action_space = spaces.Box(0.0, float(WINDOW_SIZE), shape=(2,), dtype=np.float64)
        self.observation_space = self._make_observation_space()
        self.reward_range = (0.0, 1.0)

        # Physics and rendering state; built on reset (space) or on first use (pygame surfaces).
        self.space: pymunk.Space | None = None
        self.agent: pymunk.Body | None = None
        self.block: pymunk.Body | None = None
        self._n_contact_points = 0
        self.latest_action: np.ndarray | None = None
        self._canvas = None
        self._background = None
        self._draw_options = None
        self._window = None
        self._clock = None
        self._goal_polys = self._block_polygons_at(GOAL_POSE)

    # ------------------------------------------------------------------ spaces
    def _make_observation_space(self) -> spaces.Space:
        s = self.observation_size
        pixels = spaces.Box(0, 255, shape=(s, s, 3), dtype=np.uint8)
        if self.obs_type == "state":
            high = np.array([WINDOW_SIZE] * 4 + [2 * np.pi], dtype=np.float64)
            return spaces.Box(np.zeros(5), high, dtype=np.float64)
        if self.obs_type == "keypoints":
            # The T reaches up to ~120 px past its origin, and the legacy reset can place the origin
            # near a wall, so keypoints can leave the window: bound them by one window on each side.
            return spaces.Box(-float(WINDOW_SIZE), 2.0 * WINDOW_SIZE, shape=(20,), dtype=np.float64)
        if self.obs_type == "pixels":
            return pixels
        agent_pos = spaces.Box(0.0, float(WINDOW_SIZE), shape=(2,), dtype=np.float64)
        return spaces.Dict({"pixels": pixels, "agent_pos": agent_pos})

    # ------------------------------------------------------------------ physics setup
    def _setup(self) -> None:
        """Build a fresh space (as the original does on every reset, so no contact cache carries over)."""
        space = pymunk.Space()
        space.gravity = (0, 0)
        space.damping = 0.0 if self.damping is None else self.damping
        # Walls first, then agent, then block: the order of the original.
        for a, b in WALLS:
            wall = pymunk.Segment(space.static_body, a, b, WALL_RADIUS)
            wall.color = LIGHT_GRAY
            space.add(wall)

        agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        agent.position = (256, 400)
        circle = pymunk.Circle(agent, AGENT_RADIUS)
        circle.color = ROYAL_BLUE
        space.add(agent, circle)

        block = pymunk.Body(BLOCK_MASS, BLOCK_MOMENT)
        crossbar = pymunk.Poly(block, CROSSBAR)
        stem = pymunk.Poly(block, STEM)
        for shape in (crossbar, stem):
            shape.color = LIGHT_SLATE_GRAY
            shape.filter = pymunk.ShapeFilter(mask=pymunk.ShapeFilter.ALL_MASKS())
        # The plain mean of the two centroids, (0, 45), not the area-weighted one (0, 40.71).
        block.center_of_gravity = (crossbar.center_of_gravity + stem.center_of_gravity) / 2
        block.position = (256, 300)
        block.angle = 0.0
        space.add(block, crossbar, stem)
        if self.block_cog is not None:
            block.center_of_gravity = self.block_cog

        space.on_collision(0, 0, post_solve=self._count_contacts)
        self.space, self.agent, self.block = space, agent, block
        self._n_contact_points = 0

    def _count_contacts(self, arbiter: pymunk.Arbiter, space: pymunk.Space, data: Any) -> None:
        self._n_contact_points += _contact_count(arbiter)

    def _set_state(self, state: np.ndarray, legacy: bool) -> None:
        """Set [agent_x, agent_y, block_x, block_y, angle], then run one 0.01 s physics step.

        Setting a pymunk angle rotates the body about its centre of gravity, so the order matters: legacy
        (position, then angle) moves the origin; non-legacy (angle, then position) puts it exactly at (bx, by).
        """
        ax, ay, bx, by, angle = (float(v) for v in state)
        self.agent.position = (ax, ay)
        if legacy:
            self.block.position = (bx, by)
            self.block.angle = angle
        else:
            self.block.angle = angle
            self.block.position = (bx, by)
        self.space.step(DT)

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Rebuild the space and draw (or set) the initial state; see the class docstring."""
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"reset_to_state"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; known: ['reset_to_state']")
        state = options.get("reset_to_state")
        if state is not None:
            state = np.asarray(state, dtype=np.float64)
            if state.shape != (5,):
                raise ValueError(
                    "reset_to_state must be [agent_x, agent_y, block_x, block_y, block_angle] "
                    f"(5 numbers), got shape {state.shape}"
                )
            if not np.all(np.isfinite(state)):
                raise ValueError(f"reset_to_state must be finite, got {state.tolist()}")
        if seed is None:
            # Keep gymnasium's contract: unseeded resets are driven by self.np_random.
            seed = int(self.np_random.integers(0, 2**31 - 1))
        self._seed = seed
        self._setup()
        self.latest_action = None
        if state is None:
            rs = np.random.RandomState(seed)
            state = np.array(
                [
                    rs.randint(50, 450),
                    rs.randint(50, 450),
                    rs.randint(100, 400),
                    rs.randint(100, 400),
                    rs.randn() * 2 * np.pi - np.pi,
                ],
                dtype=np.float64,
            )
            self._set_state(state, legacy=self.legacy)
        else:
            self._set_state(state, legacy=False)
        obs = self._get_obs()
        info = self._get_info()
        if self.render_mode == "human":
            self.render()
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Track the target position for 10 substeps of 0.01 s; reward = clip(coverage / 0.95, 0, 1)."""
        if self.space is None:
            raise RuntimeError("call reset() before step()")
        action = self._check_action(action)
        self.latest_action = action
        self._n_contact_points = 0
        track_target(self.space, self.agent, float(action[0]), float(action[1]))

        info = self._get_info()
        coverage = info["coverage"]
        reward = float(np.clip(coverage / SUCCESS_THRESHOLD, 0.0, 1.0))
        terminated = bool(coverage > SUCCESS_THRESHOLD)
        obs = self._get_obs()
        if self.render_mode == "human":
            self.render()
        return obs, reward, terminated, False, info

    @staticmethod
    def _check_action(action: Any) -> np.ndarray:
        return check_xy_action(action, "the target position [x, y] in pixels")

    def render(self) -> np.ndarray | None:
        """rgb_array: the frame (render_size) with a red cross at the last action; human: draw the window."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array'")
            return None
        if self.space is None:
            raise RuntimeError("call reset() before render()")
        if self.render_mode == "human":
            return self._render_human()
        img = self._render_image(self.render_size)
        if self.latest_action is not None:
            s = self.render_size
            coord = (self.latest_action / WINDOW_SIZE * s).astype(np.int32)
            cv2.drawMarker(
                img,
                (int(coord[0]), int(coord[1])),
                color=(255, 0, 0),
                markerType=cv2.MARKER_CROSS,
                markerSize=int(8 / 96 * s),
                thickness=max(1, int(1 / 96 * s)),
            )
        return img

    def close(self) -> None:
        if self._window is not None:
            import pygame

            pygame.display.quit()
            self._window = None
            self._clock = None

    # ------------------------------------------------------------------ observations and info
    def _get_obs(self) -> Any:
        if self.obs_type == "state":
            return self._state_obs()
        if self.obs_type == "keypoints":
            return np.concatenate([self._block_keypoints().reshape(-1), self._agent_pos()])
        pixels = self._render_image(self.observation_size)
        if self.obs_type == "pixels":
            return pixels
        return {"pixels": pixels, "agent_pos": self._agent_pos()}

    def _agent_pos(self) -> np.ndarray:
        return np.array(tuple(self.agent.position), dtype=np.float64)

    def _state_obs(self) -> np.ndarray:
        ax, ay = self.agent.position
        bx, by = self.block.position
        return np.array([ax, ay, bx, by, self.block.angle % (2 * np.pi)], dtype=np.float64)

    def _block_keypoints(self) -> np.ndarray:
        """(9, 2) world keypoints = R(angle) @ local + origin (raw angle, body origin)."""
        bx, by = self.block.position
        return to_world(np.array([bx, by, self.block.angle]), BLOCK_KEYPOINTS_LOCAL)

    def _get_info(self) -> dict[str, Any]:
        coverage = self._coverage()
        bx, by = self.block.position
        return {
            "coverage": coverage,
            "is_success": bool(coverage > SUCCESS_THRESHOLD),
            "pos_agent": np.array(tuple(self.agent.position), dtype=np.float64),
            "vel_agent": np.array(tuple(self.agent.velocity), dtype=np.float64),
            "block_pose": np.array([bx, by, self.block.angle], dtype=np.float64),
            "goal_pose": np.array(GOAL_POSE, dtype=np.float64),
            "n_contacts": int(math.ceil(self._n_contact_points / N_SUBSTEPS)),
        }

    @staticmethod
    def _block_polygons_at(pose: tuple[float, float, float]) -> np.ndarray:
        """The two block rectangles placed at an (origin x, origin y, angle) pose, as shapely polygons."""
        body = pymunk.Body(1, pymunk.moment_for_box(1, (50, 100)))
        body.position = pose[:2]
        body.angle = pose[2]
        return np.array(
            [
                shapely.Polygon([tuple(body.local_to_world(v)) for v in verts])
                for verts in (CROSSBAR, STEM)
            ]
        )

    def _coverage(self) -> float:
        """area(goal ∩ block) / area(goal); the pairwise sum equals the original's MultiPolygon intersection."""
        bx, by = self.block.position
        if (bx - GOAL_POSE[0]) ** 2 + (by - GOAL_POSE[1]) ** 2 > _NO_OVERLAP_DIST**2:
            return 0.0  # too far apart to touch: skip the geometry (the exact answer is 0 as well)
        local_to_world = self.block.local_to_world
        verts = np.array([[tuple(local_to_world(v)) for v in poly] for poly in _BLOCK_LOCAL_VERTS])
        block = shapely.polygons(verts)
        inter = shapely.area(shapely.intersection(self._goal_polys[:, None], block[None, :])).sum()
        return float(inter / BLOCK_AREA)

    # ------------------------------------------------------------------ rendering
    def _ensure_canvas(self) -> None:
        """Create the 512 px canvas and the static background (white + goal T) on first use."""
        if self._canvas is not None:
            return
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import pygame

        self._canvas = pygame.Surface((WINDOW_SIZE, WINDOW_SIZE), depth=32)
        # Byte offsets of R, G, B inside a 32-bit pixel (little-endian masks).
        self._rgb_bytes = [shift // 8 for shift in self._canvas.get_shifts()[:3]]
        self._draw_options = _make_draw_options(self._canvas)
        background = pygame.Surface((WINDOW_SIZE, WINDOW_SIZE))
        background.fill((255, 255, 255))
        goal = pymunk.Body(1, pymunk.moment_for_box(1, (50, 100)))
        goal.position = GOAL_POSE[:2]
        goal.angle = GOAL_POSE[2]
        for verts in (CROSSBAR, STEM):
            pts = [(round(p[0]), round(p[1])) for p in (goal.local_to_world(v) for v in verts)]
            pts += [pts[0]]
            pygame.draw.polygon(background, LIGHT_GREEN, pts)
        self._background = background

    def _render_canvas(self) -> Any:
        """Draw the full 512 px scene: background (white + goal), then pymunk's debug draw (shapes, contacts)."""
        self._ensure_canvas()
        self._canvas.blit(self._background, (0, 0))
        self.space.debug_draw(self._draw_options)
        return self._canvas

    def _render_image(self, size: int) -> np.ndarray:
        """HxWx3 uint8 RGB at `size`: the 512 px canvas resized with cv2 INTER_LINEAR, as the original.

        Reads the canvas's 32-bit pixel buffer in place and resizes all 4 bytes per pixel (channels are resized
        independently, so this equals resizing the RGB copy) before picking R, G, B: no full-size copy.
        """
        canvas = self._render_canvas()
        buf = canvas.get_buffer()  # locks the surface until released
        raw = np.frombuffer(buf, dtype=np.uint8).reshape(WINDOW_SIZE, canvas.get_pitch() // 4, 4)
        raw = raw[:, :WINDOW_SIZE]
        if size != WINDOW_SIZE:
            raw = cv2.resize(raw, (size, size), interpolation=cv2.INTER_LINEAR)
        img = np.ascontiguousarray(raw[..., self._rgb_bytes])
        del raw, buf  # unlock the surface before the next blit
        return img

    def _render_human(self) -> None:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import pygame

        if self._window is None:
            pygame.display.init()  # display only: no audio device needed
            self._window = pygame.display.set_mode((WINDOW_SIZE, WINDOW_SIZE))
            pygame.display.set_caption("Push-T")
            self._clock = pygame.time.Clock()
        canvas = self._render_canvas()
        self._window.blit(canvas, (0, 0))
        if self.latest_action is not None:
            x, y = (int(v) for v in self.latest_action)
            pygame.draw.line(self._window, (255, 0, 0), (x - 6, y), (x + 6, y), 2)
            pygame.draw.line(self._window, (255, 0, 0), (x, y - 6), (x, y + 6), 2)
        pygame.event.pump()
        pygame.display.update()
        self._clock.tick(self.metadata["render_fps"])
        return None
