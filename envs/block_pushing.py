"""Multimodal Block Pushing: push two cubes into two target zones, either cube to either zone.

The benchmark of IBC and BET that the Diffusion Policy paper uses for multimodal behaviour, re-written
for gymnasium on pybullet (DIRECT mode, no window). The scene follows the original
(real-stanford/diffusion_policy `env/block_pushing/block_pushing_multimodal.py`, from google-research/ibc):
an xArm 6 from pybullet_data moved by inverse kinematics and joint position control, a suction-head
effector held to its flange by a fixed constraint, two 4 cm cubes on a plane, two visual zones, 1/240 s
physics steps, 10 Hz control, and the same reset distribution, observation, reward and termination.
Bodies the original loads from its own URDF files are built here from primitive shapes with the same
sizes, masses and friction. Nothing here imports `diffusion_policy`: envs are a leaf package.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.actions import check_xy_action


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """Silence the C library's banner lines ("pybullet build time", "argv[0]=") on stdout/stderr."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


with _quiet_fds():
    import pybullet
    import pybullet_data
    from pybullet_utils import bullet_client

CONTROL_HZ = 10
PHYSICS_HZ = 240  # pybullet's default step, the original's
N_SUBSTEPS = PHYSICS_HZ // CONTROL_HZ
SETTLE_STEPS = 100  # physics steps after building the scene and after placing the objects
MAX_EPISODE_STEPS = 350  # the registered time limit (envs.BLOCKPUSH_MAX_EPISODE_STEPS)

EFFECTOR_HEIGHT = 0.06  # metres: height of the xArm flange (link 6) the effector hangs from
EFFECTOR_START = (0.3, -0.4)
EFFECTOR_DOWN = (
    0.0,
    1.0,
    0.0,
    6.123233995736766e-17,
)  # xyzw: half a turn about y (tool points down)
WORKSPACE_BOUNDS = np.array(((0.15, -0.5), (0.7, 0.5)))  # (min xy, max xy) of the effector target
ACTION_LIMIT = 0.1  # metres per step: the original's action box (its oracle moves <= 0.035)
# Joint angles that put the flange at (0.3, -0.4, 0.07) pointing down (no IK surprises at reset).
INITIAL_JOINTS = (
    -0.9254632489674508,
    0.6990770671568564,
    -1.106629064060494,
    0.0006653351931553931,
    0.3987969742311386,
    -4.063402065624296,
)
JOINT_FORCE = 5 * 240.0
FLANGE_LINK = 6
EFFECTOR_MAX_FORCE = 50.0  # the constraint that holds the effector to the flange
# Inertias (kg m^2) pybullet gives the original's URDF bodies: its box estimate of each collision
# shape (the head's is its mesh's) times the URDFs' <inertia_scaling value="3"/>, which pybullet applies.
INERTIA_SCALING = 3.0
HEAD_INERTIA = (3.88e-05, 3.88e-05, 1.28e-05)
TIP_INERTIA = (3.05e-05, 3.05e-05, 3.2e-06)

BLOCK_SIZE = 0.04
BLOCK_MASS = 0.01
FRICTION = 1.0  # lateral friction of blocks, effector (and pybullet's plane.urdf)
ROLLING_FRICTION = 1e-4
ZONE_SIZE = 0.12  # side of a target zone's square outline
ZONE_HEIGHT = 0.02

GOAL_TOLERANCE = 0.05  # a block is in a zone when its centre is closer than this to the zone's
MIN_BLOCK_DX = 0.1  # reset: the blocks' x coordinates differ by more than this
MIN_TARGET_DX = 0.12
MAX_RESET_TRIES = 1000
REWARD_ENTER = 0.49  # the first time a block enters a zone (per block and zone)
REWARD_BOTH = 0.51  # both blocks in different zones: the episode ends

# The 16-d state of the original's blockpush_lowdim_seed task, in its order.
STATE_LAYOUT = (
    ("block_translation", 2),
    ("block_orientation", 1),
    ("block2_translation", 2),
    ("block2_orientation", 1),
    ("effector_translation", 2),
    ("effector_target_translation", 2),
    ("target_translation", 2),
    ("target_orientation", 1),
    ("target2_translation", 2),
    ("target2_orientation", 1),
)
STATE_DIM = sum(n for _, n in STATE_LAYOUT)
# Column slices of each named part of the state (the oracle reads the state through these).
STATE_SLICES = {}
_i = 0
for _name, _n in STATE_LAYOUT:
    STATE_SLICES[_name] = slice(_i, _i + _n)
    _i += _n
del _i, _name, _n

BLOCK_COLORS = ((1.0, 0.3412, 0.349, 1.0), (0.3412, 1.0, 0.349, 1.0))
ZONE_COLORS = ((0.0, 1.0, 0.0, 1.0), (1.0, 0.0, 0.0, 1.0))
EFFECTOR_COLOR = (0.18, 0.506, 0.773, 1.0)
CAMERA_EYE = (1.0, 0.0, 0.75)  # the original's default camera: in front of the table, looking down
CAMERA_EULER = (math.pi / 4, math.pi, -math.pi / 2)
CAMERA_FOV = 2 * math.degrees(math.atan(120 / (0.803 * 320)))  # its vertical field of view


def _yaw_quat(yaw: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))


def mode_name(order: list[tuple[int, int]]) -> str:
    """`[(block, zone), ...]` in the order the blocks reached them -> "block0->target1,block1->target0"."""
    return ",".join(f"block{b}->target{t}" for b, t in order)


class BlockPushMultimodalEnv(gym.Env):
    """Push two blocks into two zones, in either assignment and either order (the paper's Block Pushing).

    ## Description
    An xArm's suction-head effector, 6 cm above the table, pushes two 4 cm cubes (red `block`, green
    `block2`) on a plane; two 12 cm zones (`target`, `target2`) lie 0.24 m apart on the far side. Each
    step moves the effector target by the action, clipped to the workspace, solves IK for the flange
    and runs 24 physics steps of 1/240 s under joint position control (10 Hz), as the original.

    ## Action Space
    `Box(-0.1, 0.1, (2,), float32)`: the change of the effector target's x, y in metres. Not clipped
    (as the original); the target is clipped to the workspace x in [0.15, 0.7], y in [-0.5, 0.5].
    Wrong shapes and NaN/Inf raise `ValueError`.

    ## Observation Space
    `obs_type="state"`: float64 (16,) = block xy, block yaw, block2 xy, block2 yaw, effector xy (the
    flange), effector target xy, target xy, target yaw, target2 xy, target2 yaw; yaws are mod pi, as
    the original's (`STATE_LAYOUT`, `STATE_SLICES` name the columns).

    ## Rewards
    0.49 on each step where a block first enters a zone (its centre within 0.05 m of the zone's;
    once per block and zone), and 0.51 instead on the step where both blocks are in different zones.

    ## Starting State
    `reset(seed=s)` draws the original's distribution with `np.random.RandomState(s)` in the original's
    order (block x, y, angle; block2 away from block in x; the zones' side flipped at random), so seed
    s is the original's initial condition s; unseeded resets draw the seed from `self.np_random`.
    The scene is built and settled (100 physics steps of 1/240 s), the blocks and zones are placed,
    and it settles for 100 more, as the original's reset (which restores a saved scene instead).

    ## Episode End
    Terminated when both blocks are in different zones; `gymnasium.make("BlockPushMultimodal-v0")`
    truncates at 350 steps.

    ## Info
    `is_success` (both blocks in different zones now), `p1` (a block has entered a zone this episode),
    `p2` (both blocks have been in different zones), `mode` (the block -> zone assignment in the order
    the blocks reached their zones, so far: "", "block1->target0", then
    "block1->target0,block0->target1"), `block_zone` (each block's zone now, -1 for none) and
    `entered` ((2, 2) bool: block b has entered zone t). `metadata` names them for evaluators.
    """

    metadata = {
        "render_modes": ["rgb_array"],
        "render_fps": CONTROL_HZ,
        "success_key": "is_success",
        "event_keys": ("p1", "p2"),
        "mode_key": "mode",
    }

    def __init__(
        self, obs_type: str = "state", render_mode: str | None = None, render_size: int = 96
    ) -> None:
        if obs_type != "state":
            raise ValueError(f"unknown obs_type {obs_type!r}; Block Pushing has 'state'")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"unknown render_mode {render_mode!r}; expected None or one of {self.metadata['render_modes']}"
            )
        if int(render_size) != render_size or render_size < 1:
            raise ValueError(f"render_size must be a positive integer, got {render_size!r}")
        self.obs_type = obs_type
        self.render_mode = render_mode
        self.render_size = int(render_size)
        self.action_space = spaces.Box(-ACTION_LIMIT, ACTION_LIMIT, shape=(2,), dtype=np.float32)
        self.observation_space = self._make_observation_space()
        self.reward_range = (0.0, REWARD_BOTH)
        with _quiet_fds():
            self._client: bullet_client.BulletClient | None = bullet_client.BulletClient(
                connection_mode=pybullet.DIRECT
            )
        self._target_xy = np.array(EFFECTOR_START, dtype=np.float64)
        self._targets: list[tuple[np.ndarray, float]] = []
        self._entered = np.zeros((2, 2), dtype=bool)
        self._entered_step = np.full((2, 2), -1)
        self._steps = 0
        self._p2 = False
        self._order: list[tuple[int, int]] = []
        self._ready = False

    # ------------------------------------------------------------------ spaces and scene
    @staticmethod
    def _make_observation_space() -> spaces.Box:
        lo, hi = [], []
        for name, n in STATE_LAYOUT:
            if name.startswith("effector"):
                lo += list(WORKSPACE_BOUNDS[0] - 0.1)  # a margin for IK lag, as the original
                hi += list(WORKSPACE_BOUNDS[1] + 0.1)
            elif name.endswith("orientation"):
                lo, hi = lo + [-2 * math.pi], hi + [2 * math.pi]
            else:
                lo, hi = lo + [-5.0] * n, hi + [5.0] * n
        return spaces.Box(np.array(lo), np.array(hi), dtype=np.float64)

    def _build_scene(self) -> None:
        """Plane, xArm with its effector, zones and blocks, settled: where every episode starts.

        Built anew on every reset. The original restores a saved state instead, but pybullet's
        restoreState keeps solver caches (warm-started contacts and joint motors): measured here, every
        4th restore of one seed drifted by 2e-6 m, and partial rebuilds carried 3e-5 m over from the
        previous episode, so a reset would not be a function of its seed alone."""
        c = self._client
        c.resetSimulation()
        c.setGravity(0, 0, -9.8)
        c.setTimeStep(1.0 / PHYSICS_HZ)
        c.setAdditionalSearchPath(pybullet_data.getDataPath())
        c.loadURDF("plane.urdf", basePosition=[0, 0, -0.001])
        self._add_workspace_visual()
        self._arm = c.loadURDF("xarm/xarm6_robot.urdf", [0, 0, 0])
        self._joints = [
            i
            for i in range(c.getNumJoints(self._arm))
            if c.getJointInfo(self._arm, i)[2] == pybullet.JOINT_REVOLUTE
        ]
        for j, q in zip(self._joints, INITIAL_JOINTS):
            c.changeDynamics(self._arm, j, linearDamping=0, angularDamping=0)
            c.resetJointState(self._arm, j, q)
        self._effector, self._constraint = self._add_effector()
        self._zones = [self._add_zone(color) for color in ZONE_COLORS]
        self._blocks = [self._add_block(color, (0.4 + 0.1 * k, -0.2)) for k, color in enumerate(BLOCK_COLORS)]  # fmt: skip
        for _ in range(SETTLE_STEPS):
            c.stepSimulation()

    def _add_workspace_visual(self) -> None:
        c = self._client
        vis = c.createVisualShape(
            pybullet.GEOM_BOX, halfExtents=[0.3, 0.55, 0.0005], rgbaColor=[0.2, 0.2, 0.2, 1]
        )
        c.createMultiBody(0, -1, vis, basePosition=[0.425, 0, -0.0005])

    def _add_effector(self) -> tuple[int, int]:
        """The suction head: a 1 cm wide, 3 cm long cylinder and a 2 mm tip, 0.1 kg each, fixed to the flange."""
        c = self._client
        pos, orn = c.getLinkState(self._arm, FLANGE_LINK, computeForwardKinematics=True)[:2]
        head_c = c.createCollisionShape(
            pybullet.GEOM_CYLINDER, radius=0.005, height=0.03, collisionFramePosition=[0, 0, 0.015]
        )
        head_v = c.createVisualShape(
            pybullet.GEOM_CYLINDER,
            radius=0.005,
            length=0.03,
            visualFramePosition=[0, 0, 0.015],
            rgbaColor=[0.2, 0.2, 0.2, 1],
        )
        tip_c = c.createCollisionShape(pybullet.GEOM_CYLINDER, radius=0.001, height=0.028)
        tip_v = c.createVisualShape(
            pybullet.GEOM_CYLINDER, radius=0.005, length=0.01, rgbaColor=EFFECTOR_COLOR
        )
        body = c.createMultiBody(
            0.1,
            head_c,
            head_v,
            basePosition=pos,
            baseOrientation=orn,
            linkMasses=[0.1],
            linkCollisionShapeIndices=[tip_c],
            linkVisualShapeIndices=[tip_v],
            linkPositions=[[0, 0, 0.029]],
            linkOrientations=[[0, 0, 0, 1]],
            linkInertialFramePositions=[[0, 0, 0]],
            linkInertialFrameOrientations=[[0, 0, 0, 1]],
            linkParentIndices=[0],
            linkJointTypes=[pybullet.JOINT_FIXED],
            linkJointAxis=[[0, 0, 1]],
        )
        for link, inertia in ((-1, HEAD_INERTIA), (0, TIP_INERTIA)):
            c.changeDynamics(
                body,
                link,
                lateralFriction=FRICTION,
                rollingFriction=ROLLING_FRICTION,
                localInertiaDiagonal=inertia,
            )
        cid = c.createConstraint(
            self._arm, FLANGE_LINK, body, -1, pybullet.JOINT_FIXED, (0, 0, 0), (0, 0, 0), (0, 0, 0)
        )
        c.changeConstraint(cid, maxForce=EFFECTOR_MAX_FORCE)
        return body, cid

    def _add_zone(self, color: tuple[float, ...]) -> int:
        """A zone: a visual-only square outline (no collision), as the original's zone mesh."""
        c = self._client
        half, wall = ZONE_SIZE / 2, 0.003
        shapes = [((half, wall, 0.0005), (0, y, 0)) for y in (-half + wall, half - wall)]
        shapes += [((wall, half, 0.0005), (x, 0, 0)) for x in (-half + wall, half - wall)]
        vis = c.createVisualShapeArray(
            shapeTypes=[pybullet.GEOM_BOX] * 4,
            halfExtents=[s[0] for s in shapes],
            visualFramePositions=[s[1] for s in shapes],
            rgbaColors=[color] * 4,
        )
        return c.createMultiBody(0, -1, vis, basePosition=[0.4, 0.2, ZONE_HEIGHT])

    def _add_block(self, color: tuple[float, ...], xy: Any, yaw: float = 0.0) -> int:
        """A 4 cm cube with its centre on the table plane (z = 0) as the original places it; it
        rises out of the plane while the scene settles."""
        c = self._client
        half = [BLOCK_SIZE / 2] * 3
        col = c.createCollisionShape(pybullet.GEOM_BOX, halfExtents=half)
        vis = c.createVisualShape(pybullet.GEOM_BOX, halfExtents=half, rgbaColor=color)
        pos, orn = [float(xy[0]), float(xy[1]), 0.0], _yaw_quat(yaw)
        body = c.createMultiBody(BLOCK_MASS, col, vis, basePosition=pos, baseOrientation=orn)
        inertia = INERTIA_SCALING * BLOCK_MASS * BLOCK_SIZE**2 / 6
        c.changeDynamics(
            body,
            -1,
            lateralFriction=FRICTION,
            rollingFriction=ROLLING_FRICTION,
            localInertiaDiagonal=[inertia] * 3,
        )
        return body

    # ------------------------------------------------------------------ reset distribution
    @staticmethod
    def sample_layout(
        seed: int,
    ) -> tuple[list[tuple[np.ndarray, float]], list[tuple[np.ndarray, float]]]:
        """The original's reset draws for `seed`: ([(block xy, yaw)] x 2, [(zone xy, yaw)] x 2).

        Same generator, same draws in the same order (including its quirks: rejection on the x
        coordinates only, and `uniform(pi)`, i.e. a block yaw between 1 and pi).
        """
        rs = np.random.RandomState(seed)

        def block_xy() -> np.ndarray:
            return np.array([0.4 + rs.uniform(-0.1, 0.1), -0.2 + rs.uniform(-0.15, 0.15)])

        def zone_xy(add: float) -> np.ndarray:
            return np.array([0.4 + add + rs.uniform(-0.005, 0.005), 0.2 + rs.uniform(-0.0075, 0.0075)])  # fmt: skip

        for _ in range(MAX_RESET_TRIES):
            b0 = (block_xy(), rs.uniform(math.pi))
            b1 = _draw_apart(block_xy, b0[0][0], MIN_BLOCK_DX)
            b1 = (b1, rs.uniform(math.pi))
            if abs(b0[0][0] - b1[0][0]) > MIN_BLOCK_DX:
                break
        add = 0.12 * rs.choice([-1, 1])
        t0 = (zone_xy(add), math.pi + rs.uniform(-math.pi / 30, math.pi / 30))
        t1 = _draw_apart(lambda: zone_xy(-add), t0[0][0], MIN_TARGET_DX)
        t1 = (t1, math.pi + rs.uniform(-math.pi / 30, math.pi / 30))
        return [b0, b1], [t0, t1]

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Put the arm back, place blocks and zones for `seed`, and let them settle."""
        super().reset(seed=seed)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; Block Pushing takes none")
        if self._client is None:
            raise RuntimeError("the env is closed")
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 1))
        c = self._client
        blocks, self._targets = self.sample_layout(seed)
        self._build_scene()
        self._target_xy = np.array(EFFECTOR_START, dtype=np.float64)
        self._drive_effector()
        for body, (xy, yaw) in zip(self._blocks, blocks):
            c.resetBasePositionAndOrientation(body, [xy[0], xy[1], 0.0], _yaw_quat(yaw))
        for body, (xy, yaw) in zip(self._zones, self._targets):
            c.resetBasePositionAndOrientation(body, [xy[0], xy[1], ZONE_HEIGHT], _yaw_quat(yaw))
        for _ in range(SETTLE_STEPS):
            c.stepSimulation()
        self._entered[:] = False
        self._entered_step[:] = -1
        self._steps, self._p2, self._order = 0, False, []
        self._ready = True
        return self._state(), self._info(self._block_zones())

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self._ready:
            raise RuntimeError("call reset() before step()")
        delta = check_xy_action(action, "the effector move [dx, dy] in metres")
        self._target_xy = np.clip(self._target_xy + delta, *WORKSPACE_BOUNDS)
        self._drive_effector()
        for _ in range(N_SUBSTEPS):
            self._client.stepSimulation()
        self._steps += 1
        reward, zones = self._reward()
        both = bool(reward >= 0.5)
        self._p2 |= both
        return self._state(), reward, both, False, self._info(zones)

    def _drive_effector(self) -> None:
        """IK for the flange at the effector target, then joint position targets (the original's control)."""
        c = self._client
        current = [s[0] for s in c.getJointStates(self._arm, self._joints)]
        goal = c.calculateInverseKinematics(
            self._arm,
            FLANGE_LINK,
            [self._target_xy[0], self._target_xy[1], EFFECTOR_HEIGHT],
            EFFECTOR_DOWN,
            lowerLimits=[-17] * 6,
            upperLimits=[17] * 6,
            jointRanges=[17] * 6,
            restPoses=[0, 0] + current[2:],
            maxNumIterations=100,
            residualThreshold=1e-10,
        )
        c.setJointMotorControlArray(
            self._arm,
            self._joints,
            pybullet.POSITION_CONTROL,
            targetPositions=goal,
            forces=[JOINT_FORCE] * 6,
        )

    # ------------------------------------------------------------------ state, reward, info
    def _block_poses(self) -> list[tuple[np.ndarray, float]]:
        c = self._client
        out = []
        for body in self._blocks:
            pos, orn = c.getBasePositionAndOrientation(body)
            out.append((np.array(pos[:2]), c.getEulerFromQuaternion(orn)[2]))
        return out

    def _state(self) -> np.ndarray:
        c = self._client
        (b0, y0), (b1, y1) = self._block_poses()
        flange = c.getLinkState(self._arm, FLANGE_LINK)[0][:2]
        zones = [(xy, c.getEulerFromQuaternion(_yaw_quat(yaw))[2]) for xy, yaw in self._targets]
        parts = [b0, [y0 % math.pi], b1, [y1 % math.pi], flange, self._target_xy]
        for xy, yaw in zones:
            parts += [xy, [yaw % math.pi]]
        return np.concatenate(parts).astype(np.float64)

    def _block_zones(self) -> list[int]:
        """Each block's nearest zone if it is inside it (closer than the tolerance), else -1."""
        out = []
        for xy, _ in self._block_poses():
            d = [np.linalg.norm(xy - t) for t, _ in self._targets]
            k = int(np.argmin(d))
            out.append(k if d[k] < GOAL_TOLERANCE else -1)
        return out

    def _reward(self) -> tuple[float, list[int]]:
        """The original's reward: 0.49 per first entry of a block into a zone; 0.51 for both blocks in."""
        reward = 0.0
        blocks = self._block_poses()
        for t, (txy, _) in enumerate(self._targets):
            for b, (bxy, _) in enumerate(blocks):
                if not self._entered[b, t] and np.linalg.norm(bxy - txy) < GOAL_TOLERANCE:
                    self._entered[b, t] = True
                    self._entered_step[b, t] = self._steps
                    reward += REWARD_ENTER
        zones = self._block_zones()
        if zones[0] >= 0 and zones[1] >= 0 and zones[0] != zones[1]:
            reward = REWARD_BOTH
            if len(self._order) < 2:
                pairs = [(0, zones[0]), (1, zones[1])]
                self._order = sorted(pairs, key=lambda p: (self._entered_step[p], p[0]))
        elif not self._order and self._entered.any():
            b, t = divmod(int(np.argmin(np.where(self._entered, self._entered_step, 10**9))), 2)
            self._order = [(b, t)]
        return reward, zones

    def _info(self, zones: list[int]) -> dict[str, Any]:
        both = zones[0] >= 0 and zones[1] >= 0 and zones[0] != zones[1]
        return {
            "is_success": bool(both),
            "p1": bool(self._entered.any()),
            "p2": bool(self._p2 or both),
            "mode": mode_name(self._order),
            "block_zone": np.array(zones, dtype=np.int64),
            "entered": self._entered.copy(),
        }

    # ------------------------------------------------------------------ rendering
    def render(self) -> np.ndarray | None:
        """rgb_array: a render_size x render_size frame from the original's camera (TinyRenderer)."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array'")
            return None
        if not self._ready:
            raise RuntimeError("call reset() before render()")
        c, s = self._client, self.render_size
        rot = np.array(c.getMatrixFromQuaternion(c.getQuaternionFromEuler(CAMERA_EULER))).reshape(
            3, 3
        )
        look, up = rot @ np.array([0.0, 0.0, 1.0]), rot @ np.array([0.0, -1.0, 0.0])
        view = c.computeViewMatrix(CAMERA_EYE, np.add(CAMERA_EYE, look).tolist(), up.tolist())
        proj = c.computeProjectionMatrixFOV(CAMERA_FOV, 1.0, 0.01, 10.0)
        _, _, rgba, _, _ = c.getCameraImage(
            s,
            s,
            view,
            proj,
            renderer=pybullet.ER_TINY_RENDERER,
            flags=pybullet.ER_NO_SEGMENTATION_MASK,
        )
        return np.asarray(rgba, dtype=np.uint8).reshape(s, s, 4)[..., :3].copy()

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client = None
            self._ready = False


def _draw_apart(draw: Any, x_avoid: float, min_dx: float) -> np.ndarray:
    """Redraw xy until its x differs from `x_avoid` by more than `min_dx` (the original's rejection)."""
    xy = draw()
    for _ in range(MAX_RESET_TRIES - 1):
        if abs(xy[0] - x_avoid) > min_dx:
            break
        xy = draw()
    return xy
