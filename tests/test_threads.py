"""torch's CPU threads: the measured default is set before torch loads, an explicit value wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_policy.errors import ConfigError
from diffusion_policy.threads import configure_threads, default_threads

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_default_rule(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads(1) == 1 and default_threads(2) == 2 and default_threads(8) == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins over the rule
    assert default_threads(2) == 3


def test_set_before_torch_loads_and_an_explicit_value_wins():
    code = "from diffusion_policy.threads import configure_threads; import sys; n = configure_threads({}); import torch, os; print(n, torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"  # fmt: skip
    expected = os.cpu_count() or 1  # the rule in a process without OMP_NUM_THREADS
    assert _python(code.format("None")) == f"{expected} {expected} {expected} PASSIVE True"
    explicit = 1 if expected != 1 else 2  # not the default
    assert _python(code.format(explicit)) == f"{explicit} {explicit} {explicit} PASSIVE True"
    # the user's own settings win over the default
    assert (
        _python(code.format("None"), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
        == "1 1 1 ACTIVE True"
    )


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
