"""torch's CPU threads: set before torch loads, adapted to other processes' load, an explicit value fixed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion_policy import threads as th
from diffusion_policy.errors import ConfigError
from diffusion_policy.threads import MARK, ThreadGuard, configure_threads, default_threads

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMP_") and k != MARK}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_default_rule(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(MARK, raising=False)
    assert default_threads(1) == 1 and default_threads(2) == 2 and default_threads(8) == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins over the rule
    assert default_threads(2) == 3
    monkeypatch.setenv(MARK, "3")  # ... but not a value dp set itself (a parent dp process)
    assert default_threads(2) == 2


STATE = "from diffusion_policy import threads as th; import sys; n = th.configure_threads({}); import torch, os; print(n, torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], os.environ.get('OMP_WAIT_POLICY', '-'), th._guard is not None, 'torch' in sys.modules)"  # fmt: skip


def test_set_before_torch_loads_adaptive_by_default_and_an_explicit_value_is_fixed():
    cores = os.cpu_count() or 1  # the rule in a process without OMP_NUM_THREADS
    # the default: every core, OpenMP's own wait policy, adapted by the guard
    assert _python(STATE.format("None")) == f"{cores} {cores} {cores} - True True"
    explicit = 1 if cores != 1 else 2  # not the default
    assert _python(STATE.format(explicit)) == f"{explicit} {explicit} {explicit} - False True"
    # the user's own settings win, and fix the count
    assert _python(STATE.format("None"), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE") == "1 1 1 ACTIVE False True"  # fmt: skip
    # a dp process started by dp adapts too: the OMP_NUM_THREADS it inherits is marked as dp's
    assert _python(STATE.format("None"), OMP_NUM_THREADS=str(cores), **{MARK: str(cores)}) == f"{cores} {cores} {cores} - True True"  # fmt: skip


def test_without_proc_the_default_is_every_core_with_passive_workers():
    code = STATE.replace("n = th.configure_threads", "th._proc_readable = lambda: False; n = th.configure_threads")  # fmt: skip
    cores = os.cpu_count() or 1
    assert _python(code.format("None")) == f"{cores} {cores} {cores} PASSIVE False True"


class FakeMachine:
    """A clock and /proc/stat-like counters at 100 ticks per second per core."""

    def __init__(self):
        self.t, self.busy, self.own = 0.0, 0, 0
        self.applied: list[int] = []

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.t += seconds
        self.own += round(100 * seconds * own_cores)
        self.busy += round(100 * seconds * (own_cores + other_cores))

    def guard(self, cores: int) -> ThreadGuard:
        return ThreadGuard(cores, self.applied.append, every=2.0, clock=lambda: self.t,
                           read_busy=lambda: self.busy, read_own=lambda: self.own, ticks_per_s=100)  # fmt: skip


def test_the_guard_gives_a_core_back_while_another_process_keeps_it_busy():
    m = FakeMachine()
    g = m.guard(2)
    m.run(2.0, own_cores=2.0, other_cores=0.05)  # idle but for noise: every core
    assert g() == 2 and m.applied == []
    m.run(1.0, own_cores=1.0, other_cores=1.0)  # a competitor starts: not re-read before 2 s
    assert g() == 2 and m.applied == []
    m.run(1.0, own_cores=1.0, other_cores=1.0)
    assert g() == 1 and m.applied == [1] and g.others == pytest.approx(1.0)
    m.run(2.0, own_cores=1.0, other_cores=1.0)  # it goes on: the count stays, nothing re-applied
    assert g() == 1 and m.applied == [1]
    m.run(2.0, own_cores=1.0, other_cores=0.0)  # it stopped: both cores again
    assert g() == 2 and m.applied == [1, 2]
    m.run(2.0, own_cores=2.0, other_cores=0.25)  # light load (below YIELD_AT) keeps every core
    assert g() == 2


def test_the_guard_target_per_load():
    g = FakeMachine().guard(8)
    assert [g.target(x) for x in (0.0, 0.3, 0.31, 1.0, 1.3, 1.31, 3.0, 20.0)] == [
        8,
        8,
        7,
        7,
        7,
        6,
        5,
        1,
    ]
    assert FakeMachine().guard(1).target(5.0) == 1  # never below one thread


def test_the_guard_reads_this_machine():
    """The /proc readers give ticks that grow with work, and a guard over them runs."""
    busy0, own0 = th._cpu_busy_ticks(), th._own_ticks()
    x = torch.randn(256, 256)
    for _ in range(400):
        x = torch.tanh(x @ x)
    assert th._cpu_busy_ticks() >= busy0 and th._own_ticks() > own0
    g = ThreadGuard(2, lambda n: None, every=0.0)
    assert g() in (1, 2) and g.others >= 0.0


def test_a_child_process_counts_as_this_run_not_as_a_competitor():
    """Vector-env workers are this run's own load: the guard must not yield a thread to them."""
    own0 = th._own_ticks()
    child = subprocess.run([sys.executable, "-c", "import time; t = time.process_time()\nwhile time.process_time() - t < 1.0: pass\nprint(1)"], capture_output=True, timeout=60)  # fmt: skip
    assert child.returncode == 0
    assert th._own_ticks() - own0 >= 0.8 * os.sysconf("SC_CLK_TCK")  # its 1 s of CPU, reaped
    # and a live one (read through /proc/PID/task/*/children)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        own0, child0 = th._own_ticks(), th._proc_ticks(str(busy.pid))
        time.sleep(1.0)
        own1, child1 = th._own_ticks(), th._proc_ticks(str(busy.pid))
    finally:
        busy.kill()
        busy.wait()
    assert child1 - child0 > 0 and own1 - own0 >= child1 - child0


def test_adapt_threads_applies_the_guard_and_is_a_no_op_when_fixed(monkeypatch):
    monkeypatch.setattr(th, "_guard", None)
    assert th.adapt_threads() is None
    m = FakeMachine()
    monkeypatch.setattr(th, "_guard", m.guard(2))
    m.run(2.0, own_cores=1.0, other_cores=1.0)
    assert th.adapt_threads() == 1 and m.applied == [1]
    assert th.thread_metrics() == {"sys/threads": torch.get_num_threads(), "sys/other_cores": 1.0}


def test_after_torch_loads_it_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert configure_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads=-1"):
        configure_threads(-1)


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["train", "no_such_preset_x"], None),  # train.num_threads, if set, wins later in train()
        (["eval", "/nonexistent/run", "--threads", "2"], 2),
        (["distill", "/nonexistent/run", "--out", "/tmp/nonexistent_out", "--threads", "2"], 2),
        (["serve", "/nonexistent/run", "--threads", "2"], 2),
        (["quickstart", "--data", "/nonexistent.zarr"], 0),
    ],
)
def test_every_verb_sets_threads_before_torch_loads(argv, want):
    """Each verb calls configure_threads (with its --threads) before anything imports torch."""
    code = f"""
import json, sys
import diffusion_policy.threads as th
calls = []
real = th.configure_threads
th.configure_threads = lambda n=None: calls.append(['torch' in sys.modules, n]) or real(n)
from diffusion_policy.cli.main import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps(calls))
"""
    calls = json.loads(_python(code))
    assert calls and calls[0] == [False, want]
