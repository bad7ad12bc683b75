"""The scripted Push-T expert and `dp data generate`: valid stores, exact replay, success, human-like motion."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_policy.cli.main import main
from diffusion_policy.data.expert import generate, run_episode
from diffusion_policy.data.replay_buffer import ReplayBuffer, validate
from diffusion_policy.errors import DataError, UserError
from envs.pusht import PushTEnv
from envs.pusht_expert import ExpertConfig

EXPECTED = {
    "img": ((96, 96, 3), np.uint8),
    "keypoint": ((9, 2), np.float32),
    "state": ((5,), np.float32),
    "action": ((2,), np.float32),
    "n_contacts": ((1,), np.float32),
}


@pytest.fixture(scope="module")
def two_demos(tmp_path_factory):
    """Seeds 8 and 9 (82 and 130 steps with the default expert), generated once for this module."""
    out = tmp_path_factory.mktemp("gen") / "demos.zarr"
    summary = generate(out, n_episodes=2, seed_start=8, workers=1, verbose=False)
    return out, summary


def test_generate_writes_a_valid_store_in_the_human_layout(two_demos):
    out, summary = two_demos
    assert validate(out) == []
    assert summary.n_success == 2 and summary.n_kept == 2
    buf = ReplayBuffer.load(out)
    assert sorted(buf.keys()) == sorted(EXPECTED)
    for key, (shape, dtype) in EXPECTED.items():
        assert buf[key].shape[1:] == shape, key
        assert buf[key].dtype == dtype, key
    assert buf.n_episodes == 2 and buf.n_steps == summary.n_steps_kept
    assert 0 < buf.episode_lengths.max() < 300
    assert buf["img"].min() < 100 < buf["img"].max()  # a real rendering, not a blank frame
    assert set(np.unique(buf["n_contacts"])) <= set(range(0, 20))


def test_generated_episodes_replay_in_the_env_and_end_on_success(two_demos):
    """reset_to_state at the first state, step the recorded actions: the block follows within 1 px."""
    out, _ = two_demos
    buf = ReplayBuffer.load(out)
    env = PushTEnv(obs_type="keypoints")
    for i in range(buf.n_episodes):
        ep = buf.get_episode(i)
        states, actions = ep["state"].astype(np.float64), ep["action"].astype(np.float64)
        obs, _ = env.reset(options={"reset_to_state": states[0]})
        np.testing.assert_allclose(obs[:18].reshape(9, 2), ep["keypoint"][0], atol=1e-3)
        np.testing.assert_allclose(obs[18:], states[0, :2], atol=1e-3)
        for k in range(len(actions)):
            obs, _, terminated, _, info = env.step(actions[k])
            if k + 1 < len(actions):
                assert not terminated, f"episode {i} succeeded early, at step {k}"
                drift = np.abs(info["block_pose"] - states[k + 1, 2:]).max()
                assert drift < 1.0, f"episode {i} step {k + 1}: block {drift:.3f} px off"
                np.testing.assert_allclose(obs[:18].reshape(9, 2), ep["keypoint"][k + 1], atol=1.0)
        assert terminated and info["coverage"] > 0.95, f"episode {i} does not end on success"


def test_generated_motion_is_smooth_and_human_paced(two_demos):
    """Targets move continuously at most transit_speed px per step, starting at the agent."""
    out, _ = two_demos
    buf = ReplayBuffer.load(out)
    cfg = ExpertConfig()
    for i in range(buf.n_episodes):
        ep = buf.get_episode(i)
        steps = np.linalg.norm(np.diff(ep["action"], axis=0), axis=1)
        assert steps.max() <= cfg.transit_speed + 1e-3
        assert 4.0 < np.median(steps) < 16.0  # the human demos' median is 8 px per step
        assert np.linalg.norm(ep["action"][0] - ep["state"][0, :2]) <= cfg.transit_speed + 1e-3


@pytest.mark.parametrize("seed", [4, 6])
def test_expert_solves_easy_seeds_quickly(seed):
    res = run_episode(seed, record=False)
    assert res.success and res.max_reward == 1.0
    assert res.n_steps <= 150, f"seed {seed} took {res.n_steps} steps"


def test_failures_are_left_out_unless_kept(tmp_path):
    out = tmp_path / "fail.zarr"
    summary = generate(out, 1, seed_start=0, verbose=False, max_steps=5)
    assert summary.n_success == 0 and summary.n_kept == 0 and not out.exists()
    summary = generate(out, 1, seed_start=0, verbose=False, max_steps=5, keep_failures=True)
    assert summary.n_kept == 1 and ReplayBuffer.open(out).episode_lengths.tolist() == [5]


def test_workers_give_the_same_demos_as_one_process(tmp_path):
    """Each episode's randomness comes from its seed, so spawning workers changes nothing."""
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    kw = dict(n_episodes=2, seed_start=3, verbose=False, max_steps=12, keep_failures=True)
    generate(one, workers=1, **kw)
    generate(two, workers=2, **kw)
    a, b = ReplayBuffer.load(one), ReplayBuffer.load(two)
    assert a.episode_ends.tolist() == b.episode_ends.tolist() == [12, 24]
    for key in EXPECTED:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_generate_rejects_bad_input(tmp_path):
    with pytest.raises(UserError, match="--episodes"):
        generate(tmp_path / "x.zarr", 0, verbose=False)
    with pytest.raises(UserError, match="--workers"):
        generate(tmp_path / "x.zarr", 1, workers=0, verbose=False)
    (tmp_path / "exists.zarr").mkdir()
    with pytest.raises(DataError, match="already exists"):
        generate(tmp_path / "exists.zarr", 1, verbose=False)


def test_dp_data_generate_cli(tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    argv = ["data", "generate", "pusht", "--episodes", "1", "--seed-start", "8"]
    assert main([*argv, "--out", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "success          1/1 = 100.0%" in text and "per episode" in text
    assert validate(out) == []
    assert main([*argv, "--out", str(out)]) == 2  # refuses to overwrite, one-line error
    assert "already exists" in capsys.readouterr().err


def test_planner_steps_with_the_envs_own_pd_law():
    """One copy of the physics: the planning sim and the env end a step in the same state, bit for bit."""
    from envs.pusht_expert import _PlanningSim

    env = PushTEnv(obs_type="state")
    _, info = env.reset(seed=5)
    sim = _PlanningSim()
    sim.set_state(info["pos_agent"], info["vel_agent"], info["block_pose"])
    for target in ([200.0, 300.0], [260.0, 250.0], [300.0, 200.0]):
        _, _, _, _, info = env.step(np.array(target))
        sim.step(np.array(target))
        assert tuple(sim.env.agent.position) == tuple(env.agent.position)
        assert tuple(sim.env.agent.velocity) == tuple(env.agent.velocity)
