"""The Push-T episode format, in one place: the keys a store holds, their dtypes and shapes, how a
step is written (`frame`, `stack_episode`) and the declared task spec each observation type is
shorthand for (`pusht_spec`, read by data/task_spec.py).

The layout is the human set's (PUSHT_SPEC.md §2.2): each step stores the observation BEFORE the action
with that action. `img` is uint8 in the stores we write (the human set stores float32 0..255; the
reader accepts both). `state` holds the RAW (unwrapped) block angle; the `state` observation wraps it.

Observation keys match the env's observation keys exactly, because evaluation feeds env observations
straight to the policy:
  * "state"            -> `state` (5,) float32: agent xy, block xy, block angle mod 2π (as the env).
  * "keypoints"        -> `keypoints` (20,) float32: 9 block keypoints (18) then agent xy (2).
  * "pixels_agent_pos" -> `pixels` (H, W, 3) uint8 HWC and `agent_pos` (2,) float32.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.data.task_spec import KeySpec, Source, TaskSpec, read_frames
from diffusion_policy.errors import DataError

# key -> (trailing shape, None where any size is fine; allowed dtype kinds; what it holds)
KEYS: dict[str, tuple[tuple[int | None, ...], str, str]] = {
    "img": ((None, None, 3), "uf", "HWC RGB frames, uint8 or float 0..255"),
    "keypoint": ((9, 2), "f", "the T's 9 keypoints in px"),
    "state": ((5,), "f", "agent xy, block xy, raw block angle"),
    "action": ((2,), "f", "target xy in px"),
    "n_contacts": ((1,), "f", "contact count of the previous step"),
}
STORE_KEYS = tuple(KEYS)
OBS_TYPES = ("state", "keypoints", "pixels_agent_pos")
# Store keys each obs type reads besides "action"; loading only these keeps `state` runs off the 2.8 GB img.
NEEDS: dict[str, tuple[str, ...]] = {
    "state": ("state",),
    "keypoints": ("keypoint", "state"),
    "pixels_agent_pos": ("img", "state"),
}


def needed_keys(obs_type: str) -> list[str]:
    """The store keys training on `obs_type` reads."""
    if obs_type not in OBS_TYPES:
        raise DataError(f"unknown Push-T obs_type {obs_type!r} (known: {', '.join(OBS_TYPES)})")
    return ["action", *NEEDS[obs_type]]


# ---------------------------------------------------------------------------------------------- writing
def block_keypoints(block_pose: np.ndarray) -> np.ndarray:
    """(9, 2) keypoints of the T at a pose, exactly as the env's keypoint observation places them."""
    from envs.pusht import BLOCK_KEYPOINTS_LOCAL, to_world

    return to_world(np.asarray(block_pose, dtype=np.float64), BLOCK_KEYPOINTS_LOCAL)


def frame(obs: dict[str, np.ndarray], info: dict[str, Any]) -> dict[str, np.ndarray]:
    """One stored step (before its action) from a `pixels_agent_pos` observation and its info.

    `state` holds the RAW block angle (info.block_pose), as the human set; `n_contacts` is the info
    that came with this observation, i.e. the contacts of the previous step.
    """
    return {
        "img": np.asarray(obs["pixels"], dtype=np.uint8),
        "keypoint": block_keypoints(info["block_pose"]).astype(np.float32),
        "state": np.concatenate([info["pos_agent"], info["block_pose"]]).astype(np.float32),
        "n_contacts": np.array([info["n_contacts"]], dtype=np.float32),
    }


def stack_episode(
    frames: list[dict[str, np.ndarray]], actions: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """Stack per-step frames and actions into the store's per-key (L, ...) arrays."""
    out = {k: np.stack([f[k] for f in frames]) for k in STORE_KEYS if k != "action"}
    out["action"] = np.asarray(actions, dtype=np.float32).reshape(-1, 2)
    return out


# ---------------------------------------------------------------------------------------------- checking
def key_problem(buffer: ReplayBuffer, key: str) -> str | None:
    """Why `data/<key>` cannot be read as the Push-T format says (missing, wrong dtype or shape), or None."""
    where = buffer.path or "<memory>"
    if key not in buffer:
        return f"{where}: missing key data/{key} (have: {', '.join(buffer.keys()) or 'none'})"
    shape, kinds, what = KEYS[key]
    arr = buffer[key]
    dtype, trailing = np.dtype(arr.dtype), tuple(arr.shape[1:])
    if dtype.kind not in kinds or (kinds == "uf" and dtype.kind == "u" and dtype != np.uint8):
        want = "uint8 or float" if kinds == "uf" else "float"
        return f"{where}: data/{key}: dtype {dtype} but Push-T {key} ({what}) is {want}"
    if len(trailing) != len(shape) or any(
        s is not None and s != t for s, t in zip(shape, trailing)
    ):
        want = tuple("*" if s is None else s for s in shape)
        return (
            f"{where}: data/{key}: frames of shape {trailing} but Push-T {key} ({what}) is {want}"
        )
    return None


def obs_type_problems(buffer: ReplayBuffer) -> dict[str, list[str]]:
    """For every Push-T obs type, why this store cannot train it (an empty list: it can)."""
    return {t: [p for k in needed_keys(t) if (p := key_problem(buffer, k))] for t in OBS_TYPES}


def require(buffer: ReplayBuffer, keys: list[str]) -> None:
    """Raise one DataError for the first of `keys` that is not in the Push-T format."""
    for k in keys:
        problem = key_problem(buffer, k)
        if problem:
            raise DataError(problem)


# ---------------------------------------------------------------------------------------------- reading
def pusht_spec(obs_type: str) -> TaskSpec:
    """The declared spec that `task.obs_type` is shorthand for. `state` keeps a reader of its own:
    its block angle is wrapped to [0, 2π) as the env observes it, which no declaration expresses."""
    check = partial(require, keys=needed_keys(obs_type))  # an unknown obs type: one line naming it
    action = KeySpec("task.action", "low_dim", (Source("action"),), shape=(2,))
    agent_pos = (Source("state", 0, 2),)  # agent xy
    if obs_type == "state":
        obs = {"state": KeySpec("task.obs.state", "low_dim", (Source("state"),), shape=(5,))}
        return TaskSpec(obs, action, "pusht:state", reader=_state_frames, check=check)
    if obs_type == "keypoints":  # the 9 keypoints flattened, then agent xy
        sources = (Source("keypoint"), *agent_pos)
        obs = {"keypoints": KeySpec("task.obs.keypoints", "low_dim", sources, shape=(20,))}
        return TaskSpec(obs, action, "pusht:keypoints", check=check)
    obs = {
        "pixels": KeySpec("task.obs.pixels", "rgb", (Source("img"),), rgb_from_float=True),
        "agent_pos": KeySpec("task.obs.agent_pos", "low_dim", agent_pos, shape=(2,)),
    }
    return TaskSpec(obs, action, "pusht:pixels_agent_pos", check=check)


def _state_frames(buffer: ReplayBuffer) -> dict[str, np.ndarray]:
    state = buffer.read("state").astype(np.float32)
    wrapped = np.concatenate([state[:, :4], np.mod(state[:, 4:5], 2 * np.pi)], axis=1)
    return {"state": wrapped, "action": buffer.read("action").astype(np.float32)}


def pusht_frames(buffer: ReplayBuffer, obs_type: str) -> dict[str, np.ndarray]:
    """Per-frame arrays (N, ...) for one obs type, computed once: obs keys plus "action"."""
    return read_frames(buffer, pusht_spec(obs_type))
