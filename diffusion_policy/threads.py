"""torch's CPU threads for `dp train`, `dp eval`, `dp distill`, `dp serve` and `dp quickstart`.

Why: with torch's default (one OpenMP thread per core, spin-waiting), one other busy process on
one of 2 cores made training 6-17x slower (issue 15). scripts/bench_threads.py measures each
setting idle and with a competitor; the default here is its result (docs: notes/budget.md).
OpenMP reads OMP_NUM_THREADS and OMP_WAIT_POLICY when torch loads, so `configure_threads` runs at
the top of each verb's run(), before torch is imported. No torch import here.
"""

from __future__ import annotations

import os
import sys

from diffusion_policy.errors import ConfigError

THREADS_HELP = (
    "torch CPU threads (0 = the measured default: every core, with OMP_WAIT_POLICY=PASSIVE; "
    "a set OMP_NUM_THREADS replaces it)"
)
WAIT_POLICY = "PASSIVE"  # idle OpenMP threads sleep instead of spinning on a busy core


def default_threads(cores: int | None = None) -> int:
    """The threads a run gets when none is asked for: the user's OMP_NUM_THREADS if set, else
    every core. With OMP_WAIT_POLICY=PASSIVE (set by configure_threads) that was the best setting
    idle and with a competitor together (scripts/bench_threads.py, 2 cores): as fast as torch's
    default idle, and no collapse beside a busy process, where torch's default lost half its speed."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return cores or os.cpu_count() or 1


def configure_threads(requested: int | None = None) -> int:
    """Set the threads for this process: `requested` (a --threads flag, train.num_threads) if
    > 0, else `default_threads()`. Before torch loads it sets OMP_NUM_THREADS and, unless the user
    set one, OMP_WAIT_POLICY=PASSIVE; after, it can only call torch.set_num_threads. Returns the
    number chosen."""
    if requested is not None and requested < 0:
        raise ConfigError(f"threads={requested}: must be >= 0 (0 = the default)")
    n = requested if requested else default_threads()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    return n
