"""A declared task: which store keys make each policy observation and the action, checked and read.

A `TaskSpec` is what `task.obs` / `task.action` in a config declare (config.py: ObsKeyConfig,
ActionConfig), resolved into sources: each low-dim key (and the action) is its sources' frames,
flattened per frame, sliced by `"key[a:b]"` and concatenated in order, as float32; an rgb key is one
uint8 (H, W, 3) source. `read_frames` checks the store against the spec before reading anything big,
and every problem is one DataError naming the spec key (task.obs.KEY or task.action) and the store key.

Push-T's shorthand (`task.obs_type`) expands to a spec in data/pusht_format.py; its `reader` keeps
the two conversions the published store needs and no declaration can express (the block angle
wrapped to [0, 2π), float 0..255 frames rounded to uint8).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.errors import DataError
from diffusion_policy.shapes import ObsSpec, ShapeMeta

_SOURCE = re.compile(r"\s*([^\[\]\s]+)\s*(?:\[\s*(\d*)\s*:\s*(\d*)\s*\])?\s*")


@dataclass(frozen=True)
class Source:
    """One store key, optionally columns [start, stop) of its flattened frame."""

    key: str
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, text: str, where: str) -> Source:
        m = _SOURCE.fullmatch(str(text))
        if not m:
            raise DataError(f'{where}: source {text!r}: expected "key" or "key[a:b]"')
        key, a, b = m.groups()
        bracket = "[" in str(text)
        return cls(key, int(a) if a else (0 if bracket else None), int(b) if b else None)

    def __str__(self) -> str:
        if self.start is None and self.stop is None:
            return self.key
        return f"{self.key}[{self.start or 0}:{'' if self.stop is None else self.stop}]"


@dataclass
class KeySpec:
    """A policy key (an observation, or the action) and how its frames come from the store."""

    where: str  # its config path, for messages: task.obs.KEY or task.action
    kind: str  # low_dim | rgb (the action is low_dim)
    sources: tuple[Source, ...]
    normalize: str = "minmax"
    shape: tuple[int, ...] | None = None  # declared per-frame shape; None: whatever the store gives
    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    rgb_from_float: bool = (
        False  # rgb: float 0..255 frames are rounded to uint8 (Push-T's human set)
    )


@dataclass
class TaskSpec:
    """Observation keys (rgb first, then low-dim, as the policy orders them) and the action."""

    obs: dict[str, KeySpec]
    action: KeySpec
    label: str = "task"
    # a format's own reader (Push-T): store -> frames {obs key..., "action"}; checked like any other
    reader: Callable[[ReplayBuffer], dict[str, np.ndarray]] | None = field(default=None, repr=False)
    # a format's own check of the store (Push-T: its keys' dtypes and shapes), run before the spec's
    check: Callable[[ReplayBuffer], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        order = sorted(self.obs, key=lambda k: self.obs[k].kind != "rgb")  # stable: rgb first
        self.obs = {k: self.obs[k] for k in order}
        if "action" in self.obs:
            raise DataError("task.obs.action: 'action' names the action; call the observation else")

    def keys(self) -> dict[str, KeySpec]:
        """Every policy key: the observations then "action"."""
        return {**self.obs, "action": self.action}

    def store_keys(self) -> list[str]:
        """The store keys the spec reads, each once, in order of first use."""
        return list(dict.fromkeys(s.key for k in self.keys().values() for s in k.sources))


def spec_from_config(task) -> TaskSpec:
    """A declared TaskConfig (task.obs non-empty) as a TaskSpec; see data/datasets.py for Push-T."""
    obs = {}
    for name, c in task.obs.items():
        where = f"task.obs.{name}"
        sources = tuple(Source.parse(s, where) for s in (c.source or [name]))
        hw = {k: tuple(v) if v is not None else None for k, v in (("resize", c.resize), ("crop", c.crop))}  # fmt: skip
        normalize = "minmax" if c.kind == "rgb" else (c.normalize or "minmax")
        shape = tuple(c.shape) if c.shape is not None else None
        obs[name] = KeySpec(where, c.kind, sources, normalize, shape, **hw)
    a = task.action
    action = KeySpec(
        "task.action",
        "low_dim",
        tuple(Source.parse(s, "task.action") for s in a.source),
        a.normalize,
        (a.dim,) if a.dim is not None else None,
    )
    return TaskSpec(obs, action, label=task.name)


# ---------------------------------------------------------------------------------------------- checking
def _frame_shape(spec: KeySpec, buffer: ReplayBuffer) -> tuple[int, ...]:
    """The per-frame shape the spec gives on this store, or a DataError naming the problem."""
    where = f"{buffer.path or '<memory>'}: {spec.where}"
    n = buffer.n_steps
    width = 0
    for src in spec.sources:
        if src.key not in buffer:
            raise DataError(
                f"{where}: source {str(src)!r}: missing key data/{src.key} (the store has: {', '.join(buffer.keys()) or 'none'})"
            )
        arr = buffer[src.key]
        dtype, frame = np.dtype(arr.dtype), tuple(arr.shape[1:])
        if arr.shape[0] != n:
            raise DataError(
                f"{where}: data/{src.key} has {arr.shape[0]} frames but the episodes (meta/episode_ends) have {n}"
            )
        if spec.kind == "rgb":
            if dtype != np.uint8 and not (spec.rgb_from_float and dtype.kind == "f"):
                raise DataError(
                    f"{where}: data/{src.key} is {dtype}; an rgb key needs uint8 frames"
                )
            if len(frame) != 3 or frame[2] != 3 or src.start is not None:
                raise DataError(
                    f"{where}: data/{src.key} has frames of shape {frame}; an rgb key needs whole (H, W, 3) frames"
                )
            return frame
        if dtype.kind not in "biuf":
            raise DataError(f"{where}: data/{src.key} is {dtype}; a low-dim key needs numbers")
        d = math.prod(frame)
        a, b = src.start or 0, d if src.stop is None else src.stop
        if not 0 <= a < b <= d:
            raise DataError(
                f"{where}: source {str(src)!r} is out of range: data/{src.key} has {d} values per frame"
            )
        width += b - a
    return (width,)


def check_spec(buffer: ReplayBuffer, spec: TaskSpec) -> dict[str, tuple[int, ...]]:
    """Per-frame shapes of every policy key, after checking sources, dtypes, slices and declared shapes
    (reads no data)."""
    if spec.check is not None:
        spec.check(buffer)
    shapes = {}
    for name, key in spec.keys().items():
        shape = _frame_shape(key, buffer)
        if key.shape is not None and tuple(key.shape) != shape:
            raise DataError(
                f"{buffer.path or '<memory>'}: {key.where}: declared shape {list(key.shape)} but the store gives {list(shape)}"
            )
        if key.kind == "rgb":
            _check_crop(key, shape)
        shapes[name] = shape
    return shapes


def _check_crop(key: KeySpec, shape: tuple[int, ...]) -> None:
    src = key.resize or shape[:2]
    if key.crop is not None and (key.crop[0] > src[0] or key.crop[1] > src[1]):
        raise DataError(
            f"{key.where}.crop={list(key.crop)} must fit inside the {'resize' if key.resize else 'frames'} {list(src)}"
        )


# ---------------------------------------------------------------------------------------------- reading
def _low_dim(buffer: ReplayBuffer, key: KeySpec, cache: dict[str, np.ndarray]) -> np.ndarray:
    parts = []
    for src in key.sources:
        if src.key not in cache:
            x = buffer.read(src.key)
            cache[src.key] = x.astype(np.float32).reshape(len(x), -1)
        parts.append(cache[src.key][:, src.start : src.stop])
    return np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))


def _rgb(buffer: ReplayBuffer, key: str) -> np.ndarray:
    """uint8 frames; float 0..255 ones (allowed only by rgb_from_float) are rounded block by block,
    so they never exist in RAM as a whole float array (Push-T's pixels would be 2.8 GB)."""
    arr = buffer[key]
    if np.dtype(arr.dtype) == np.uint8:
        return np.asarray(buffer.read(key))
    out = np.empty(arr.shape, dtype=np.uint8)
    for start, block in buffer.iter_blocks(key):
        if block.size and (block.min() < 0 or block.max() > 255):
            raise DataError(f"{buffer.path}: data/{key}: values outside 0..255 near frame {start}")
        out[start : start + len(block)] = np.rint(block)
    return out


def read_frames(buffer: ReplayBuffer, spec: TaskSpec) -> dict[str, np.ndarray]:
    """Per-frame arrays (N, ...) of every policy key: float32 low-dim and action, uint8 HWC rgb."""
    shapes = check_spec(buffer, spec)
    if spec.reader is not None:
        frames = spec.reader(buffer)
    else:
        cache: dict[str, np.ndarray] = {}
        frames = {
            name: _rgb(buffer, key.sources[0].key) if key.kind == "rgb" else _low_dim(buffer, key, cache)
            for name, key in spec.keys().items()
        }  # fmt: skip
    for name, shape in shapes.items():  # a format's reader is held to its spec too
        if tuple(frames[name].shape[1:]) != shape:
            raise DataError(f"{spec.keys()[name].where}: reader gave {frames[name].shape[1:]}, spec says {shape}")  # fmt: skip
    return {name: frames[name] for name in spec.keys()}


def shape_meta(spec: TaskSpec, frames: dict[str, np.ndarray]) -> ShapeMeta:
    """What the policy is built from: shapes, kinds, normalisation and per-camera preprocessing."""
    obs = {}
    for name, k in spec.obs.items():
        shape = frames[name].shape[1:]
        if k.kind == "rgb":
            obs[name] = ObsSpec(shape, "uint8", "rgb", resize=k.resize, crop=k.crop)
        else:
            obs[name] = ObsSpec(shape, "float32", "low_dim", normalize=k.normalize)
    action_dim = int(frames["action"].shape[1])
    return ShapeMeta(obs=obs, action_dim=action_dim, action_normalize=spec.action.normalize)


# ---------------------------------------------------------------------------------------------- guessing
def _looks_like_action(key: str) -> bool:
    k = key.lower()
    return k in ("action", "actions") or k.endswith(("_action", ".action", "_actions"))


def guess_kind(key: str, dtype: np.dtype, frame: tuple[int, ...]) -> str | None:
    """`dp data info`'s guess: action, rgb (uint8 HWC), low_dim (numbers), or None (not usable:
    not numbers, or HWC frames that are not uint8, which an rgb key refuses)."""
    if dtype.kind not in "biuf":
        return None
    if _looks_like_action(key):
        return "action"
    if len(frame) == 3 and frame[2] == 3:
        return "rgb" if dtype == np.uint8 else None
    return "low_dim"


def guess_task_yaml(buffer: ReplayBuffer, path: str) -> str:
    """A pasteable `task:` block for the store: every usable key as an observation, the action
    guessed by name; unusable keys and a missing action are left as comments."""
    import yaml

    obs, actions, skipped = {}, [], []
    for key in buffer.keys():
        arr = buffer[key]
        kind = guess_kind(key, np.dtype(arr.dtype), tuple(arr.shape[1:]))
        if kind is None:
            skipped.append(f"{key} ({np.dtype(arr.dtype)} {tuple(arr.shape[1:])})")
        elif kind == "action":
            actions.append(key)
        else:
            obs[key] = {"kind": kind, "source": [key]}
            if kind == "low_dim":
                obs[key]["normalize"] = "minmax"
    name = Path(path.rstrip("/")).name.removesuffix(".zarr") or "my_robot"
    task = {
        "name": name,
        "dataset": str(path),
        "env_id": None,
        "control_hz": 10.0,
        "obs": obs,
        "action": {"source": actions[:1] or ["action"], "normalize": "minmax"},
    }
    text = yaml.safe_dump({"task": task}, sort_keys=False, default_flow_style=None)
    notes = [f"# left out (not numbers, or HWC images that are not uint8): {', '.join(skipped)}"]
    notes = notes if skipped else []
    if not actions:
        notes.append("# no key is named like an action: set task.action.source")
    elif len(actions) > 1:
        notes.append(f"# several keys look like actions ({', '.join(actions)}): the first is used")
    return "".join(n + "\n" for n in notes) + text
