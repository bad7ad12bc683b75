"""The training loop's stop request: signals finish the step and stop, a second one aborts."""

from __future__ import annotations

import os
import signal

import pytest

from diffusion_policy.config import TrainConfig
from diffusion_policy.training.loop import Dist, StopRequest


def test_a_signal_requests_a_stop_and_a_second_aborts():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(TrainConfig(), Dist(), "cpu") as stop:
        assert not stop.requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(1) and stop.agreed(stop.requested(1))
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are given back


def test_stop_at_step_and_time_limit():
    with StopRequest(TrainConfig(stop_at_step=3), Dist(), "cpu") as stop:
        assert not stop.requested(2) and stop.requested(3)
    with StopRequest(TrainConfig(time_limit_min=1.0), Dist(), "cpu") as stop:
        assert not stop.requested(10**6)
        stop.t_start -= 61
        assert stop.requested(1)


def test_only_the_main_process_installs_handlers():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(TrainConfig(), Dist(rank=1, world=2), "cpu"):
        assert signal.getsignal(signal.SIGINT) is before
