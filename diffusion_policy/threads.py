"""torch's CPU threads for `dp train`, `dp eval`, `dp distill`, `dp serve` and `dp quickstart`.

Why: with torch's default (one OpenMP thread per core, spin-waiting), one other busy process on
one of 2 cores made training 6-17x slower (issue 15), and no fixed setting was best for every
model: `OMP_WAIT_POLICY=PASSIVE` held up beside a busy process but cost the image model 43 % on an
idle machine, and 1 thread gives up the second core. So the default adapts: every core with
OpenMP's own wait policy while the machine is free, one thread fewer for each core that other
processes keep busy, read from /proc every couple of seconds (`ThreadGuard`).
scripts/bench_threads.py measures it beside the fixed settings (docs/BENCHMARKS.md).

OpenMP reads OMP_NUM_THREADS when torch loads, so `configure_threads` runs at the top of each
verb's run(), before torch is imported; the compute loops call `adapt_threads()`, which costs a
clock read between checks. No torch import here.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from diffusion_policy.errors import ConfigError

THREADS_HELP = (
    "torch CPU threads (0 = the default: every core while the machine is free, one fewer per core "
    "other processes keep busy; a set OMP_NUM_THREADS or N > 0 fixes the count)"
)
FALLBACK_WAIT_POLICY = "PASSIVE"  # where /proc cannot be read: sleeping workers survive contention
CHECK_EVERY_S = 2.0  # long enough for /proc's 10 ms ticks to average, short beside a run
YIELD_AT = 0.3  # cores of other processes' load that take one thread away (above whole cores)

MARK = "DP_AUTO_OMP_NUM_THREADS"  # the OMP_NUM_THREADS that dp set, so child processes adapt too

_guard: ThreadGuard | None = None


def _cpu_busy_ticks() -> int:
    """Ticks every core spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal


def _proc_ticks(pid: str) -> int:
    """utime + stime + reaped children's cutime + cstime of one process."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return sum(int(x) for x in fields[11:15])


def _children(pid: str) -> list[str]:
    out: list[str] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += (task / "children").read_text().split()
        except OSError:  # a thread that ended, or a kernel without the children file
            pass
    return out


def _own_ticks() -> int:
    """Ticks used by this process and its descendants (vector-env workers, data workers)."""
    total, todo = 0, [str(os.getpid())]
    while todo:
        pid = todo.pop()
        try:
            total += _proc_ticks(pid)
            todo += _children(pid)
        except (OSError, ValueError):  # a child that exited between reads
            pass
    return total


class ThreadGuard:
    """The thread count for the cores other processes leave free, re-read every `every` seconds.

    Why not a fixed count: spinning OpenMP workers collapse when another process shares their
    core (they wait on a descheduled peer), and passive ones are slow on models of many small ops.
    Fewer threads than free cores avoids both. `read_busy`, `read_own` and `clock` are injectable
    so tests run it on a fake machine."""

    def __init__(
        self,
        cores: int,
        apply: Callable[[int], None],
        every: float = CHECK_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        read_busy: Callable[[], int] = _cpu_busy_ticks,
        read_own: Callable[[], int] = _own_ticks,
        ticks_per_s: float | None = None,
    ):
        self.cores, self.apply, self.every, self.clock = cores, apply, every, clock
        self.read_busy, self.read_own = read_busy, read_own
        self.hz = ticks_per_s or float(os.sysconf("SC_CLK_TCK"))
        self.threads = cores
        self.others = 0.0  # cores other processes used over the last interval
        self._last = (clock(), read_busy(), read_own())

    def target(self, others: float) -> int:
        """Every core, less one per core of other load beyond YIELD_AT (at least 1)."""
        return max(1, self.cores - math.ceil(max(0.0, others - YIELD_AT)))

    def __call__(self) -> int:
        now = self.clock()
        t0, busy0, own0 = self._last
        if now - t0 < self.every:
            return self.threads
        busy, own = self.read_busy(), self.read_own()
        self._last = (now, busy, own)
        self.others = max(0.0, (busy - busy0) - (own - own0)) / (self.hz * (now - t0))
        n = self.target(self.others)
        if n != self.threads:
            self.apply(n)
            self.threads = n
        return n


def _user_threads() -> int | None:
    """The user's own OMP_NUM_THREADS (not one configure_threads set), if it is a count."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    ours = env == os.environ.get(MARK)
    return int(env) if env.isdigit() and int(env) > 0 and not ours else None


def default_threads(cores: int | None = None) -> int:
    """The threads a run starts with when none is asked for: the user's OMP_NUM_THREADS if set,
    else every core (the guard then takes threads away while other processes compete)."""
    return _user_threads() or cores or os.cpu_count() or 1


def _proc_readable() -> bool:
    try:
        _cpu_busy_ticks()
        _own_ticks()
        return True
    except (OSError, ValueError, IndexError):
        return False


def _set_torch_threads(n: int) -> None:
    sys.modules["torch"].set_num_threads(n)


def configure_threads(requested: int | None = None) -> int:
    """Set the threads for this process: `requested` (a --threads flag, train.num_threads) if
    > 0, or the user's OMP_NUM_THREADS, fixes the count; otherwise every core, adapted by
    `adapt_threads()` where /proc can be read (elsewhere every core with OMP_WAIT_POLICY=PASSIVE).
    Before torch loads it sets OMP_NUM_THREADS; after, torch.set_num_threads. Returns the count."""
    global _guard
    if requested is not None and requested < 0:
        raise ConfigError(f"threads={requested}: must be >= 0 (0 = the default)")
    fixed = requested or _user_threads()
    n = fixed or default_threads()
    adaptive = not fixed and _proc_readable()
    if "torch" in sys.modules:
        _set_torch_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
        if not fixed:
            os.environ[MARK] = str(n)
            if not adaptive:
                os.environ.setdefault("OMP_WAIT_POLICY", FALLBACK_WAIT_POLICY)
    _guard = ThreadGuard(n, _set_torch_threads) if adaptive else None
    return n


def adapt_threads() -> int | None:
    """Called by compute loops (a training step, a rollout's policy call, a server's batch) in the
    thread that runs torch: applies the guard's count; None when the count is fixed."""
    return _guard() if _guard is not None else None


def thread_metrics() -> dict[str, float]:
    """The current count and, when adapting, the other processes' load in cores, for metrics.jsonl."""
    out: dict[str, float] = {"sys/threads": sys.modules["torch"].get_num_threads()}
    if _guard is not None:
        out["sys/other_cores"] = round(_guard.others, 2)
    return out
