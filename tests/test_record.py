"""`dp data record`: the teleop recorder driven by injected pygame events (SDL dummy video driver)."""

from __future__ import annotations

import numpy as np
import pygame
import pytest

from diffusion_policy.cli.main import main
from diffusion_policy.data.record import record
from diffusion_policy.data.replay_buffer import ReplayBuffer, validate
from diffusion_policy.errors import DataError
from envs.pusht import PushTEnv
from envs.pusht_expert import PushTExpert

SEED = 8  # the expert solves this seed in 82 steps


def motion(pos) -> pygame.event.Event:
    return pygame.event.Event(pygame.MOUSEMOTION, pos=(float(pos[0]), float(pos[1])))


def key(k: int) -> pygame.event.Event:
    return pygame.event.Event(pygame.KEYDOWN, key=k)


@pytest.fixture()
def start_of():
    """Initial agent positions for seeds, as the recorder will see them."""
    env = PushTEnv(obs_type="state")

    def agent_at(seed: int) -> np.ndarray:
        return env.reset(seed=seed)[1]["pos_agent"]

    return agent_at


def test_record_saves_success_and_operator_ends_discards_retries_and_quits(tmp_path, start_of):
    out = tmp_path / "rec.zarr"
    expert = PushTExpert(seed=SEED)
    a1, a2 = start_of(SEED), start_of(SEED + 1)
    sent: list[np.ndarray] = []  # the mouse positions that should have become recorded actions
    state = {"i": 0, "phase": "far"}
    short = [a2 + [2.0 * k, 1.0 * k] for k in range(1, 4)]  # 3 small moves from the agent

    def events(info: dict) -> list:
        i = state["i"] = state["i"] + 1
        phase = state["phase"]
        if phase == "far":  # hover 40 px away: outside the 30 px pick-up radius, nothing recorded
            if i == 2:
                state["phase"] = "expert"
            return [motion(a1 + [40.0, 0.0])]
        if phase == "expert":
            if sent and np.allclose(info["pos_agent"], a2):  # success saved; seed 9 started
                state["phase"], state["i"] = "retry", 0
                return [motion(a2 + [1.0, 1.0])]
            # The expert's first target is 5 px from the agent: it picks the agent up at once.
            target = expert.act(info["pos_agent"], info["vel_agent"], info["block_pose"])
            sent.append(np.asarray(target, dtype=np.float64))
            return [motion(target)]
        if phase == "retry":  # 3 more moves, then R: the 4 steps are discarded, seed 9 again
            if i <= 3:
                return [motion(a2 + [1.0 + i, 1.0])]
            state["phase"], state["i"] = "save", 0
            return [key(pygame.K_r)]
        if phase == "save":  # 3 moves, then Space: saved as an operator-ended episode
            if i <= 3:
                return [motion(short[i - 1])]
            state["phase"], state["i"] = "quit", 0
            return [key(pygame.K_SPACE)]
        if i <= 2:  # seed 10: 2 moves, then Q: discarded
            return [motion(start_of(SEED + 2) + [1.0, 0.0])]
        return [key(pygame.K_q)]

    summary = record(out, seed_start=SEED, events=events, fps=0)

    assert [(s, ok) for s, _, ok in summary.saved] == [(SEED, True), (SEED + 1, False)]
    assert summary.n_episodes_in_store == 2
    assert validate(out) == []
    buf = ReplayBuffer.load(out)
    n1 = summary.saved[0][1]
    assert buf.episode_ends.tolist() == [n1, n1 + 3]
    assert buf["img"].shape == (n1 + 3, 96, 96, 3) and buf["img"].dtype == np.uint8
    assert buf["keypoint"].shape == (n1 + 3, 9, 2) and buf["state"].shape == (n1 + 3, 5)
    assert buf["n_contacts"].shape == (n1 + 3, 1) and buf["action"].dtype == np.float32
    # Episode 1: every mouse position after the pick-up is an action; it replays to success.
    np.testing.assert_allclose(buf["action"][:n1], np.array(sent), atol=1e-3)
    env = PushTEnv(obs_type="state")
    env.reset(options={"reset_to_state": buf["state"][0]})
    for a in buf["action"][:n1]:
        _, _, terminated, _, info = env.step(a)
    assert terminated and info["coverage"] > 0.95
    np.testing.assert_allclose(buf["state"][0, :2], a1, atol=1e-3)  # observation BEFORE the action
    # Episode 2: exactly the 3 moves made after the retry.
    np.testing.assert_allclose(buf["action"][n1:], np.array(short), atol=1e-3)
    np.testing.assert_allclose(buf["state"][n1, :2], a2, atol=1e-3)


def test_record_appends_and_defaults_the_seed_to_the_episode_count(tmp_path, start_of):
    """A second session continues the store; its first seed is the store's episode count (2)."""
    out = tmp_path / "rec.zarr"
    buf = ReplayBuffer.create(out)
    for length in (2, 3):
        buf.add_episode(
            {
                "img": np.full((length, 96, 96, 3), 7.0, np.float32),  # the human set's float32
                "keypoint": np.ones((length, 9, 2), np.float32),
                "state": np.ones((length, 5), np.float32),
                "action": np.ones((length, 2), np.float32),
                "n_contacts": np.ones((length, 1), np.float32),
            }
        )
    agent = start_of(2)
    script = iter(
        [[motion(agent + [3.0, 0.0])], [motion(agent + [6.0, 0.0])], [key(pygame.K_RETURN)]]
    )

    def events(info: dict) -> list:
        pygame.event.post(motion(agent + [9.0, 0.0]))  # through the real pygame queue as well
        return [*pygame.event.get(), *next(script, [key(pygame.K_ESCAPE)])]

    summary = record(out, events=events, fps=0)
    assert [s for s, _, _ in summary.saved] == [2]
    assert validate(out) == []
    buf = ReplayBuffer.load(out)
    assert buf.episode_ends.tolist() == [2, 5, 7]
    assert (
        buf["img"].dtype == np.float32 and buf["img"][5:].max() > 100
    )  # cast to the store's dtype
    np.testing.assert_allclose(buf["action"][5:], [agent + [3.0, 0.0], agent + [6.0, 0.0]])


def test_record_refuses_a_store_with_other_keys(tmp_path):
    out = tmp_path / "other.zarr"
    buf = ReplayBuffer.create(out)
    buf.add_episode({"action": np.zeros((2, 2), np.float32)})
    with pytest.raises(DataError, match="keys"):
        record(out, events=lambda info: [key(pygame.K_q)], fps=0)
    assert main(["data", "record", "pusht", "--out", str(out)]) == 2


def test_record_without_a_display_says_so_and_exits(tmp_path):
    """Issue 17 item 11: under SDL's dummy driver the window is invisible; a real session must refuse
    at once (the old loop waited forever for an operator who could see nothing)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "SDL_VIDEODRIVER": "dummy", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = tmp_path / "rec.zarr"
    cmd = [
        sys.executable,
        "-m",
        "diffusion_policy.cli",
        "data",
        "record",
        "pusht",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert (
        r.returncode == 2 and "needs a window" in r.stderr and "SDL_VIDEODRIVER=dummy" in r.stderr
    )
    assert r.stderr.count("\n") == 1 and not out.exists()
