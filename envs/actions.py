"""The one check of a 2-number action that both envs take (Push-T's target, Block Pushing's move)."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_xy_action(action: Any, what: str) -> np.ndarray:
    """`action` as a finite float64 (2,) array, else one ValueError that names the problem.

    `what` says what the two numbers mean, e.g. "the target position [x, y] in pixels".
    """
    if action is None:
        raise ValueError(f"action is None; pass {what}")
    try:
        arr = np.asarray(action, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"action must be 2 numbers ({what}), got {action!r}") from e
    if arr.shape != (2,):
        raise ValueError(f"action must have shape (2,) ({what}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"action must be finite, got {arr.tolist()}")
    return arr
