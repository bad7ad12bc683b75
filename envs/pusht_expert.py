"""A scripted Push-T expert that plans pushes in the simulator itself (privileged state, no learning).

Why: the main job (`make quickstart`) must train on a machine that cannot download the human demos, so
this planner is the offline data source (`dp data generate pusht`). The demos must be *learnable*: the
expert moves its target like a mouse (continuous, speed- and acceleration-limited, in the range of the
human demos' action steps) and pushes the T the way people do: go around the block, approach a contact
point, push, pause, repeat. Geometry, constants and the PD tracker are the env's own (envs/pusht.py).

How the expert decides (privileged state: agent position and velocity, block pose):
  1. Sample candidate pushes: a contact point on the T's outline, a push direction (inward normal,
     jittered), a length and a speed. Candidates whose start pose overlaps the block are dropped.
  2. Simulate every candidate in a private planning copy of the env (same pymunk space and PD
     tracker; the block pose is copied in, the agent starts at rest at the pre-contact point) and
     score it by the decrease rate of the keypoint error to the goal pose: log(cost before / cost after)
     divided by the steps it takes, transit around the block included. A candidate that passes
     through success (coverage > 0.95) wins outright.
  3. Execute the winner: a collision-free path around the block (grid Dijkstra on the block dilated by
     the agent radius + a margin, then string-pulled), an approach along the contact normal, the push,
     and a short hold. During the push, every step re-simulates the rest of it from the true state
     (agent velocity included) and stops early when stopping ends better. Replan when the plan is
     done, or when the block moved during the transit (an accidental bump).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import shapely

from envs import pusht as P
from envs.pusht import AGENT_RADIUS, CROSSBAR, STEM, rotation, to_world

WINDOW = float(P.WINDOW_SIZE)


def _outline() -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """The T's 8 outline edges (start, end, outward normal), walked from the crossbar's top-left corner."""
    walk = [CROSSBAR[3], CROSSBAR[2], CROSSBAR[1], STEM[3], STEM[2], STEM[1], STEM[0], CROSSBAR[0]]
    pts = [np.array(p) for p in walk]
    edges = []
    for a, b in zip(pts, pts[1:] + pts[:1]):
        d = (b - a) / np.linalg.norm(b - a)
        edges.append((a, b, np.array([d[1], -d[0]])))  # clockwise walk (y down): normal = (dy, -dx)
    return tuple(edges)


# Block-local rectangles (xmin, ymin, xmax, ymax) and outline of the env's T.
_RECTS = np.array([[*np.min(r, axis=0), *np.max(r, axis=0)] for r in (CROSSBAR, STEM)])
_EDGES = _outline()
_EDGE_LEN = np.array([math.dist(a, b) for a, b, _ in _EDGES])
_GRID = 8.0  # px per cell of the transit planner's grid
_N_CELLS = int(WINDOW // _GRID)


@dataclass
class ExpertConfig:
    """Knobs of the scripted expert. Speeds are px per 10 Hz env step (human demos: median 8, p90 21)."""

    n_candidates: int = 128  # pushes simulated per decision
    n_candidates_fine: int = 128  # ... once the keypoint error is small (fine alignment)
    fine_rms: float = 12.0  # px of keypoint RMS error below which pushes are short and many
    transit_speed: float = 20.0  # max target speed going around the block
    push_speed: float = 10.0  # max target speed while pushing
    accel: float = 5.0  # max change of target speed per step
    contact_gap: float = 3.0  # px between the agent disc and the block at the pre-contact point
    approach: float = 12.0  # px of straight approach along the contact normal before the push
    clearance: float = 12.0  # px kept between disc and block while going around it
    hold_steps: int = 2  # steps the target rests after a push (the lagging agent catches up)
    max_push: float = 120.0  # px, longest push
    min_push: float = 3.0  # px, shortest push

    def __post_init__(self) -> None:
        bad = [
            f"{k}={v!r}"
            for k, v in vars(self).items()
            if not (v >= 0 if k in ("hold_steps", "contact_gap", "clearance") else v > 0)
        ]
        if self.min_push > self.max_push:
            bad.append(f"min_push={self.min_push!r} > max_push={self.max_push!r}")
        if bad:
            raise ValueError(f"ExpertConfig: bad value(s) {', '.join(bad)}")


# ---------------------------------------------------------------------------------------------- geometry
def to_local(pose: np.ndarray, world: np.ndarray) -> np.ndarray:
    """World points (..., 2) to block-local coordinates."""
    return (world - pose[:2]) @ rotation(pose[2])


def block_distance(pose: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Distance (px) from world points (..., 2) to the T (0 inside)."""
    p = to_local(pose, world)[..., None, :]  # (..., 1, 2)
    lo, hi = _RECTS[:, :2], _RECTS[:, 2:]
    d = np.maximum(np.maximum(lo - p, p - hi), 0.0)  # (..., 2 rects, 2)
    return np.sqrt((d**2).sum(-1)).min(-1)


def _nearest_on_block(pose: np.ndarray, world: np.ndarray) -> np.ndarray:
    """The point of the T nearest to one world point (the point itself when inside)."""
    p = to_local(pose, world)
    cands = np.clip(p, _RECTS[:, :2], _RECTS[:, 2:])  # (2, 2)
    best = cands[np.argmin(((cands - p) ** 2).sum(-1))]
    return to_world(pose, best)


def segment_clear(pose: np.ndarray, a: np.ndarray, b: np.ndarray, clearance: float) -> bool:
    """True when every point of segment a-b is at least `clearance` px from the T."""
    n = max(2, int(math.dist(a, b) / 3.0) + 1)
    pts = a + (b - a) * np.linspace(0.0, 1.0, n)[:, None]
    return bool(block_distance(pose, pts).min() >= clearance)


class _Scorer:
    """Keypoint error to the goal pose and exact coverage (shapely, as the env computes it)."""

    def __init__(self) -> None:
        self.goal_pose = np.array(P.GOAL_POSE)
        self.goal_kp = to_world(self.goal_pose, P.BLOCK_KEYPOINTS_LOCAL)
        self._local_polys = [np.array(v) for v in (P.CROSSBAR, P.STEM)]
        self.goal_polys = [shapely.Polygon(to_world(self.goal_pose, v)) for v in self._local_polys]

    def cost(self, pose: np.ndarray) -> float:
        """Mean squared keypoint distance to the goal (px^2); about 4-7 px^2 is the success boundary."""
        d = to_world(pose, P.BLOCK_KEYPOINTS_LOCAL) - self.goal_kp
        return float((d * d).sum(-1).mean())

    def coverage(self, pose: np.ndarray) -> float:
        block = [shapely.Polygon(to_world(pose, v)) for v in self._local_polys]
        return float(
            sum(shapely.intersection(g, b).area for g in self.goal_polys for b in block)
            / P.BLOCK_AREA
        )

    def success(self, pose: np.ndarray, cost: float | None = None) -> bool:
        """coverage > 0.95; shapely is slow, so only poses within 4 px RMS of the goal are checked."""
        cost = self.cost(pose) if cost is None else cost
        return cost < 16.0 and self.coverage(pose) > P.SUCCESS_THRESHOLD


class _PlanningSim:
    """A private copy of the env's physics: the same pymunk space and PD tracker, state set directly.

    Setting bodies in place (instead of `reset(options={"reset_to_state": ...})`, which rebuilds the
    space) keeps a candidate rollout at ~0.1 ms per env step, and lets us set the agent's velocity.
    """

    def __init__(self) -> None:
        self.env = P.PushTEnv(obs_type="state")
        self.env.reset(seed=0)

    def set_state(
        self, agent_pos: np.ndarray, agent_vel: np.ndarray, block_pose: np.ndarray
    ) -> None:
        block, agent = self.env.block, self.env.agent
        block.angle = float(block_pose[2])  # angle first, then position: the origin lands exactly
        block.position = (float(block_pose[0]), float(block_pose[1]))
        block.velocity = (0.0, 0.0)
        block.angular_velocity = 0.0
        agent.position = (float(agent_pos[0]), float(agent_pos[1]))
        agent.velocity = (float(agent_vel[0]), float(agent_vel[1]))

    def step(self, target: np.ndarray) -> None:
        """One env step of the PD tracker toward `target` (the env's own `track_target`)."""
        P.track_target(self.env.space, self.env.agent, float(target[0]), float(target[1]))

    def block_pose(self) -> np.ndarray:
        b = self.env.block
        return np.array([b.position[0], b.position[1], b.angle])


# ---------------------------------------------------------------------------------------------- transit
def _grid_points() -> np.ndarray:
    c = _GRID / 2 + _GRID * np.arange(_N_CELLS)
    gx, gy = np.meshgrid(c, c, indexing="ij")
    return np.stack([gx, gy], -1)  # (N, N, 2), [i, j] -> (x_i, y_j)


_GRID_PTS = _grid_points()
_NEIGHBOURS = [
    (di, dj, math.hypot(di, dj) * _GRID) for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj
]


def _cell(p: np.ndarray) -> tuple[int, int]:
    i, j = (np.clip(np.asarray(p) // _GRID, 0, _N_CELLS - 1)).astype(int)
    return int(i), int(j)


class _DistanceField:
    """Shortest collision-free path lengths from one start point to every grid cell (Dijkstra).

    One field per decision prices the transit of every candidate push; the chosen one's path is read
    back through the parent links.
    """

    def __init__(self, pose: np.ndarray, start: np.ndarray, clearance: float) -> None:
        self.pose, self.clearance = pose, clearance
        self.free = block_distance(pose, _GRID_PTS) >= clearance
        self.prefix = [np.asarray(start, dtype=np.float64)]
        d0 = float(block_distance(pose, start))
        if d0 < clearance:  # in contact or close: back off along the outward direction first
            near = _nearest_on_block(pose, start)
            out = start - near
            norm = float(np.linalg.norm(out))
            if norm < 1e-6:
                out = start - to_world(pose, np.array([0.0, 45.0]))
                norm = float(np.linalg.norm(out)) or 1.0
            out = out / norm
            step = clearance + 2.0 - d0
            retreat = start + out * step
            while block_distance(pose, retreat) < clearance and step < 200:
                step += 4.0
                retreat = start + out * step
            self.prefix.append(np.clip(retreat, 0.0, WINDOW))
        self.origin = self.prefix[-1]
        n = _N_CELLS
        self.dist = np.full((n, n), np.inf)
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}
        s = _cell(self.origin)
        self.free[s] = True
        self.dist[s] = float(np.linalg.norm(_GRID_PTS[s] - self.origin))
        heap = [(self.dist[s], s)]
        dist, free = self.dist, self.free
        while heap:
            d, (i, j) = heapq.heappop(heap)
            if d > dist[i, j]:
                continue
            for di, dj, w in _NEIGHBOURS:
                a, b = i + di, j + dj
                if 0 <= a < n and 0 <= b < n and free[a, b] and d + w < dist[a, b]:
                    dist[a, b] = d + w
                    self.parent[(a, b)] = (i, j)
                    heapq.heappush(heap, (d + w, (a, b)))
        self.prefix_len = sum(math.dist(p, q) for p, q in zip(self.prefix, self.prefix[1:]))

    def length_to(self, goal: np.ndarray) -> float:
        """Approximate path length from the start to `goal` (inf when unreachable)."""
        if segment_clear(self.pose, self.origin, goal, self.clearance):
            return self.prefix_len + math.dist(self.origin, goal)
        c = _cell(goal)
        return self.prefix_len + float(self.dist[c]) + math.dist(_GRID_PTS[c], goal)

    def path_to(self, goal: np.ndarray) -> list[np.ndarray]:
        """Waypoints from the start to `goal`, string-pulled so the path hugs nothing needlessly."""
        if segment_clear(self.pose, self.origin, goal, self.clearance):
            return [*self.prefix, np.asarray(goal, dtype=np.float64)]
        c = _cell(goal)
        cells = [c]
        while cells[-1] in self.parent:
            cells.append(self.parent[cells[-1]])
        raw = [self.origin] + [_GRID_PTS[k] for k in reversed(cells)] + [np.asarray(goal, float)]
        out = [raw[0]]
        i = 0
        while i < len(raw) - 1:
            j = len(raw) - 1
            while j > i + 1 and not segment_clear(self.pose, raw[i], raw[j], self.clearance - 4.0):
                j -= 1
            out.append(raw[j])
            i = j
        return self.prefix[:-1] + out


def _profile(
    waypoints: list[np.ndarray], v0: float, v_max: float, v_end: float, accel: float
) -> list[np.ndarray]:
    """Targets along a polyline, one per env step, with a trapezoidal speed profile (starts at v0)."""
    pts = [np.asarray(p, dtype=np.float64) for p in waypoints]
    seg = np.array([math.dist(a, b) for a, b in zip(pts, pts[1:])])
    total = float(seg.sum())
    if total < 1e-6:
        return []
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    out, s, v = [], 0.0, v0
    while s < total - 1e-6:
        remaining = total - s
        v_brake = math.sqrt(v_end**2 + 2.0 * accel * remaining)  # can still slow down in time
        v = min(v + accel, v_max, max(v_brake, v_end, 1.0))
        s = min(total, s + v)
        k = min(int(np.searchsorted(cum, s, side="right")) - 1, len(seg) - 1)
        t = (s - cum[k]) / seg[k] if seg[k] > 0 else 0.0
        out.append(pts[k] + (pts[k + 1] - pts[k]) * t)
    return out


# ---------------------------------------------------------------------------------------------- expert
@dataclass
class _Push:
    c0: np.ndarray  # pre-contact agent position
    normal: np.ndarray  # outward contact normal (world)
    u: np.ndarray  # push direction (world, unit)
    length: float
    speed: float


@dataclass
class _Plan:
    targets: deque = field(default_factory=deque)
    transit_steps: int = 0  # the first targets that must not move the block
    expected_pose: np.ndarray | None = None
    pushing: bool = False  # the push may still be cut short (checked each step from the true state)


class PushTExpert:
    """Scripted Push-T demonstrator from privileged state. `act(agent_pos, agent_vel, block_pose)`."""

    def __init__(self, config: ExpertConfig | None = None, seed: int = 0) -> None:
        self.cfg = config or ExpertConfig()
        self.rng = np.random.default_rng(seed)
        self.scorer = _Scorer()
        self.sim = _PlanningSim()
        self.plan = _Plan()
        self.last_target: np.ndarray | None = None
        self.n_decisions = 0

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.plan = _Plan()
        self.last_target = None
        self.n_decisions = 0

    # ------------------------------------------------------------------ acting
    def act(
        self, agent_pos: np.ndarray, agent_vel: np.ndarray, block_pose: np.ndarray
    ) -> np.ndarray:
        """The next target position (px) for the agent."""
        agent_pos = np.asarray(agent_pos, dtype=np.float64)
        block_pose = np.asarray(block_pose, dtype=np.float64)
        if self.last_target is None:
            self.last_target = agent_pos.copy()
        plan = self.plan
        bumped = (
            plan.transit_steps > 0
            and plan.expected_pose is not None
            and np.abs(block_pose - plan.expected_pose).max() > 0.5
        )
        agent_vel = np.asarray(agent_vel, dtype=np.float64)
        if not plan.targets or bumped:
            self.plan = plan = self._decide(agent_pos, agent_vel, block_pose)
        elif plan.pushing and plan.transit_steps == 0:
            self._check_push(agent_pos, agent_vel, block_pose)
        target = plan.targets.popleft()
        if plan.transit_steps > 0:
            plan.transit_steps -= 1
            plan.expected_pose = block_pose.copy()
        else:
            plan.expected_pose = None
        self.last_target = target
        return target

    # ------------------------------------------------------------------ planning
    def _decide(self, agent_pos: np.ndarray, agent_vel: np.ndarray, pose: np.ndarray) -> _Plan:
        cfg = self.cfg
        self.n_decisions += 1
        cost_now = self.scorer.cost(pose)
        fine = math.sqrt(cost_now) < cfg.fine_rms
        field_ = _DistanceField(pose, self.last_target, AGENT_RADIUS + cfg.clearance)
        best, best_score = None, -math.inf
        for push in self._sample(pose, cfg.n_candidates_fine if fine else cfg.n_candidates, fine):
            approach_pt = push.c0 + push.normal * cfg.approach
            transit = field_.length_to(approach_pt)
            if not math.isfinite(transit):
                continue
            m = max(1, math.ceil(push.length / push.speed))
            targets = [
                push.c0 + push.u * min(push.length, push.speed * (k + 1))
                for k in range(m + cfg.hold_steps)
            ]
            cost_after, success, steps = self._simulate(push.c0, np.zeros(2), pose, targets)
            steps += transit / cfg.transit_speed + 2.0 + cfg.approach / push.speed
            if success:
                score = 1e6 - steps
            else:
                score = math.log((cost_now + 1.0) / (cost_after + 1.0)) / steps
            if score > best_score:
                best, best_score = push, score
        if best is None:  # nothing reachable: step back towards the middle and decide again
            tgt = self.last_target + np.clip(np.array([256.0, 256.0]) - self.last_target, -5, 5)
            return _Plan(targets=deque([tgt]))
        return self._execute(best, field_)

    def _sample(self, pose: np.ndarray, n: int, fine: bool) -> list[_Push]:
        cfg, rng = self.cfg, self.rng
        pushes = []
        edge = rng.choice(len(_EDGES), size=n, p=_EDGE_LEN / _EDGE_LEN.sum())
        along = rng.uniform(0.0, 1.0, n)
        jitter = rng.uniform(-0.6, 0.6, n)
        hi = min(cfg.max_push, 25.0) if fine else cfg.max_push
        length = np.exp(rng.uniform(math.log(cfg.min_push), math.log(hi), n))
        rot = rotation(pose[2])
        for e, t, phi, d in zip(edge, along, jitter, length):
            a, b, nrm = _EDGES[e]
            p_local = a + (b - a) * t
            c0_local = p_local + nrm * (AGENT_RADIUS + cfg.contact_gap)
            c0 = to_world(pose, c0_local)
            if not (0.0 <= c0[0] <= WINDOW and 0.0 <= c0[1] <= WINDOW):
                continue
            if block_distance(pose, c0) < AGENT_RADIUS + cfg.contact_gap - 0.5:
                continue  # a concave corner: the disc would start inside the other rectangle
            n_world = rot @ nrm
            u = rotation(phi) @ -n_world
            speed = float(np.clip(d / 4.0, 2.0, cfg.push_speed))
            pushes.append(_Push(c0, n_world, u, float(d), speed))
        return pushes

    def _simulate(
        self, agent_pos: np.ndarray, agent_vel: np.ndarray, pose: np.ndarray, targets: list
    ) -> tuple[float, bool, int]:
        """Play `targets` in the planning sim from a full state: (final cost, success, steps)."""
        sim, scorer = self.sim, self.scorer
        sim.set_state(agent_pos, agent_vel, pose)
        cost = scorer.cost(pose)
        for k, target in enumerate(targets):
            sim.step(target)
            p = sim.block_pose()
            cost = scorer.cost(p)
            if scorer.success(p, cost):
                return cost, True, k + 1
        return cost, False, len(targets)

    def _check_push(self, agent_pos: np.ndarray, agent_vel: np.ndarray, pose: np.ndarray) -> None:
        """Closed loop during a push: stop here when that ends better than finishing the push.

        The push was chosen from a rollout that starts at rest at the contact point; the real agent
        arrives moving, so a push that grazed success in planning can overshoot in execution.
        Re-simulating from the true state (agent velocity included) each step catches that.
        """
        plan = self.plan
        cont_cost, cont_ok, _ = self._simulate(agent_pos, agent_vel, pose, list(plan.targets))
        if cont_ok:
            return
        stop = [self.last_target.copy() for _ in range(self.cfg.hold_steps)]
        stop_cost, stop_ok, _ = self._simulate(agent_pos, agent_vel, pose, stop)
        if stop_ok or stop_cost < cont_cost:
            plan.targets = deque(stop)
            plan.pushing = False

    def _execute(self, push: _Push, field_: _DistanceField) -> _Plan:
        cfg = self.cfg
        approach_pt = push.c0 + push.normal * cfg.approach
        path = field_.path_to(approach_pt)
        transit = _profile(path, 0.0, cfg.transit_speed, push.speed, cfg.accel)
        end = push.c0 + push.u * push.length
        pushing = _profile([approach_pt, push.c0, end], push.speed, push.speed, 1.0, cfg.accel)
        hold = [end.copy() for _ in range(cfg.hold_steps)]
        targets = [np.clip(t, 0.0, WINDOW) for t in transit + pushing + hold]
        return _Plan(targets=deque(targets), transit_steps=len(transit), pushing=True)
