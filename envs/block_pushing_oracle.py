"""The scripted multimodal Block Pushing oracle: the demonstrator of the paper's Block Pushing data.

It behaves as the original's multimodal oriented-push oracle (IBC's, used for the Diffusion Policy
data): each episode it draws one of the four (block -> zone, order) plans at random, then for each
block in turn it goes to a point 5 cm behind the block on the line to its zone, rotates the block
square to that line when it is more than 0.2 rad off (by pushing beside a corner), and pushes it; once
the first block is within 4 cm of its zone it backs off through its first approach point and its
starting point before the second block. Steps are capped at 0.35 m/s (0.3 when travelling, 0.15 when
rotating). It reads only the 16-d state, so it can drive any env with that observation.
"""

from __future__ import annotations

import math

import numpy as np

from envs.block_pushing import CONTROL_HZ, STATE_SLICES

# The four plans: ((first block, its zone), (second block, its zone)); 0 = block/target, 1 = *2.
PLANS = (((0, 0), (1, 1)), ((0, 1), (1, 0)), ((1, 0), (0, 1)), ((1, 1), (0, 0)))
SWITCH_TOLERANCE = 0.04  # the first block counts as delivered this close to its zone
REACHED = 0.001  # a waypoint is reached this close (metres)
PRE_BLOCK, NEXT_TO_BLOCK, TOUCHING = 0.05, 0.03, 0.01  # distances behind the block, along the push
ORIENT_RADIUS = 0.025
ORIENT_TURN = 0.2  # radians beside the block's back where it pushes to rotate it
ORIENT_START, ORIENT_DONE = 0.2, 0.03  # |heading error| that starts / ends a rotation
SPEED_PUSH, SPEED_TRAVEL, SPEED_ORIENT = 0.35, 0.3, 0.15  # metres per second


def _rotate(v: np.ndarray, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _part(state: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(state[STATE_SLICES[name]], dtype=np.float64)


def _block_key(b: int) -> str:
    return "block" if b == 0 else "block2"


def _zone_key(t: int) -> str:
    return "target" if t == 0 else "target2"


class MultimodalPushOracle:
    """`act(state) -> action` (float32 (2,), metres); `reset(seed)` starts an episode with a random plan."""

    def __init__(self, seed: int | None = None, control_hz: float = CONTROL_HZ) -> None:
        self.control_hz = float(control_hz)
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)
        self.plan = PLANS[int(self._rng.integers(len(PLANS)))]
        self.current = self.plan[0]
        self.switched = False
        self.phase = "move_to_pre_block"
        self.origin: np.ndarray | None = None
        self.first_pre_block: np.ndarray | None = None

    @property
    def mode(self) -> str:
        """The plan, named as the env's info["mode"] names what an episode did."""
        from envs.block_pushing import mode_name

        return mode_name(list(self.plan))

    def act(self, state: np.ndarray) -> np.ndarray:
        (b0, t0), second = self.plan
        first_dist = np.linalg.norm(_part(state, f"{_block_key(b0)}_translation") - _part(state, f"{_zone_key(t0)}_translation"))  # fmt: skip
        if not self.switched and first_dist < SWITCH_TOLERANCE:
            self.current, self.switched = second, True
            self.phase = "return_to_first_pre_block"
        delta, speed = self._step(state, *self.current)
        limit = speed / self.control_hz
        n = float(np.linalg.norm(delta))
        if n > limit:
            delta = delta / n * limit
        return delta.astype(np.float32)

    def _step(self, state: np.ndarray, block: int, zone: int) -> tuple[np.ndarray, float]:
        """One step of the state machine. Phases fall through within a step, as the original's."""
        ee = _part(state, "effector_target_translation")
        xy = _part(state, f"{_block_key(block)}_translation")
        to_zone = _part(state, f"{_zone_key(zone)}_translation") - xy
        push_dir = to_zone / np.linalg.norm(to_zone)
        error = math.atan2(push_dir[1], push_dir[0]) - float(state[STATE_SLICES[f"{_block_key(block)}_orientation"]][0])  # fmt: skip
        error = (error + math.pi / 4) % (
            math.pi / 2
        ) - math.pi / 4  # a cube looks the same every quarter turn
        if self.origin is None:
            self.origin = ee.copy()
        speed, delta = SPEED_PUSH, np.zeros(2)
        if self.phase == "move_to_pre_block":
            speed, delta = SPEED_TRAVEL, self._to_pre_block(xy - push_dir * PRE_BLOCK, ee)
        if self.phase == "return_to_first_pre_block":
            speed, delta = SPEED_TRAVEL, self._back_to(self.first_pre_block, ee, "return_to_origin")
        if self.phase == "return_to_origin":
            speed, delta = SPEED_TRAVEL, self._back_to(self.origin, ee, "move_to_pre_block")
        if self.phase == "move_to_block":
            delta = xy - push_dir * NEXT_TO_BLOCK - ee
            if np.linalg.norm(delta) < REACHED:
                self.phase = "push_block"
            if abs(error) > ORIENT_START:
                self.phase = "orient_block_left" if error > 0 else "orient_block_right"
        if self.phase == "push_block":
            if abs(error) > ORIENT_START:
                self.phase = "move_to_pre_block"
            delta = xy - push_dir * TOUCHING - ee
        if self.phase in ("orient_block_left", "orient_block_right"):
            speed, delta = SPEED_ORIENT, self._orient(xy, ee, error)
        return delta, speed

    def _to_pre_block(self, pre_block: np.ndarray, ee: np.ndarray) -> np.ndarray:
        delta = pre_block - ee
        if np.linalg.norm(delta) < REACHED:
            self.phase = "move_to_block"
            if self.first_pre_block is None:
                self.first_pre_block = pre_block.copy()
        return delta

    def _back_to(self, point: np.ndarray | None, ee: np.ndarray, then: str) -> np.ndarray:
        point = self.origin if point is None else point
        delta = point - ee
        if np.linalg.norm(delta) < REACHED:
            self.phase = then
        return delta

    def _orient(self, xy: np.ndarray, ee: np.ndarray, error: float) -> np.ndarray:
        """Push beside the block's back, turned by ORIENT_TURN towards the side that rotates it back."""
        left = self.phase == "orient_block_left"
        away = (ee - xy) / np.linalg.norm(ee - xy)
        spot = xy + _rotate(away, ORIENT_TURN if left else -ORIENT_TURN) * ORIENT_RADIUS
        if (left and error < ORIENT_DONE) or (not left and error > -ORIENT_DONE):
            self.phase = "move_to_pre_block"
        return spot - ee
