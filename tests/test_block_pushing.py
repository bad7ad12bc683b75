"""Multimodal Block Pushing (envs/block_pushing.py), its oracle, and `dp data generate blockpush`."""

from __future__ import annotations

from collections import Counter

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers BlockPushMultimodal-v0)
from diffusion_policy.cli.main import main
from diffusion_policy.config import load_config
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.data.task_spec import check_spec, spec_from_config
from envs.block_pushing import (
    GOAL_TOLERANCE,
    REWARD_BOTH,
    REWARD_ENTER,
    STATE_DIM,
    STATE_SLICES,
    BlockPushMultimodalEnv,
)
from envs.block_pushing_oracle import PLANS, MultimodalPushOracle

ORACLE_SEEDS = (100000, 100001)  # test seeds; the notes give all 50


def _rollout(env: BlockPushMultimodalEnv, seed: int, actions: np.ndarray) -> np.ndarray:
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        out.append(env.step(a)[0])
    return np.array(out)


def _oracle_episode(env: BlockPushMultimodalEnv, seed: int):
    obs, info = env.reset(seed=seed)
    oracle = MultimodalPushOracle(seed=seed)
    rewards, n, terminated = [], 0, False
    while not terminated and n < 350:
        obs, reward, terminated, _, info = env.step(oracle.act(obs))
        rewards.append(reward)
        n += 1
    return oracle, rewards, info


def test_check_env_passes_and_the_spaces_are_the_originals():
    env = BlockPushMultimodalEnv()
    check_env(env, skip_render_check=True)
    assert env.observation_space.shape == (STATE_DIM,) == (16,)
    assert env.action_space.shape == (2,) and env.action_space.high.tolist() == pytest.approx([0.1, 0.1])  # fmt: skip
    env.close()
    with pytest.raises(ValueError, match="render_mode"):
        BlockPushMultimodalEnv(render_mode="human")
    with pytest.raises(ValueError, match="obs_type"):
        BlockPushMultimodalEnv(obs_type="pixels")


def test_registered_env_renders_frames_and_truncates_at_its_cap():
    env = gym.make(
        "BlockPushMultimodal-v0", render_mode="rgb_array", render_size=48, max_episode_steps=3
    )
    assert gym.spec("BlockPushMultimodal-v0").max_episode_steps == 350
    obs, info = env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (48, 48, 3) and frame.dtype == np.uint8
    assert frame.std() > 10  # a scene, not a blank image
    assert {"is_success", "p1", "p2", "mode", "block_zone", "entered"} <= set(info)
    assert env.metadata["event_keys"] == ("p1", "p2") and env.metadata["mode_key"] == "mode"
    truncated = [env.step(np.zeros(2))[3] for _ in range(3)]
    assert truncated == [False, False, True]
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3))
    env.close()
    assert env.unwrapped._client is None  # close() disconnects pybullet


def test_same_seed_same_trajectory_across_envs_and_after_other_episodes():
    actions = np.random.default_rng(0).uniform(-0.03, 0.03, size=(15, 2))
    actions[:, 1] += 0.03  # drive up the table, through the blocks' side
    a, b = BlockPushMultimodalEnv(), BlockPushMultimodalEnv()
    first = _rollout(a, 7, actions)
    # other episodes in between, and 5 resets (pybullet's restoreState drifted on every 4th one)
    for seed in (8, 7, 9, 7, 7):
        again = _rollout(b, seed, actions[::-1] if seed != 7 else actions)
        if seed == 7:
            np.testing.assert_array_equal(again, first)
    assert not np.array_equal(_rollout(a, 8, actions), first)
    # unseeded resets draw from self.np_random, seeded by the first reset
    a.reset(seed=3)
    b.reset(seed=3)
    np.testing.assert_array_equal(a.reset()[0], b.reset()[0])
    a.close()
    b.close()


def test_reset_draws_the_originals_layout():
    for seed in range(20):
        blocks, zones = BlockPushMultimodalEnv.sample_layout(seed)
        assert abs(blocks[0][0][0] - blocks[1][0][0]) > 0.1
        assert all(0.3 <= xy[0] <= 0.5 and -0.35 <= xy[1] <= -0.05 and 1 <= yaw <= np.pi for xy, yaw in blocks)  # fmt: skip
        assert abs(abs(zones[0][0][0] - zones[1][0][0]) - 0.24) < 0.011
    env = BlockPushMultimodalEnv()
    obs, _ = env.reset(seed=5)
    [(b0, _), _], _ = BlockPushMultimodalEnv.sample_layout(5)
    np.testing.assert_allclose(obs[STATE_SLICES["block_translation"]], b0, atol=2e-3)  # settled
    env.close()


def test_oracle_succeeds_and_the_env_reports_the_mode_it_chose(capsys):
    env = BlockPushMultimodalEnv()
    p1 = p2 = 0
    for seed in ORACLE_SEEDS:
        oracle, rewards, info = _oracle_episode(env, seed)
        p1, p2 = p1 + info["p1"], p2 + info["p2"]
        assert info["mode"] == oracle.mode  # the block -> zone plan, in its order
        # the original's reward: 0.49 when the first block enters, then 0.51 (both in), then the end
        assert sorted(set(rewards) - {0.0}) == [REWARD_ENTER, REWARD_BOTH]
        assert rewards[-1] == REWARD_BOTH and info["is_success"]
        zones = info["block_zone"]
        assert sorted(zones.tolist()) == [0, 1]
        for b, t in enumerate(zones):
            block = np.asarray(env._state()[STATE_SLICES[["block", "block2"][b] + "_translation"]])
            zone = env._state()[STATE_SLICES[["target", "target2"][t] + "_translation"]]
            assert np.linalg.norm(block - zone) < GOAL_TOLERANCE
    env.close()
    with capsys.disabled():
        print(f"\noracle on seeds {ORACLE_SEEDS}: p1 {p1 / len(ORACLE_SEEDS):.2f}  p2 {p2 / len(ORACLE_SEEDS):.2f}")  # fmt: skip
    assert p2 == len(ORACLE_SEEDS)


def test_oracle_draws_the_four_plans_uniformly():
    counts = Counter(MultimodalPushOracle(seed=s).plan for s in range(2000))
    assert set(counts) == set(PLANS)
    assert all(abs(c / 2000 - 0.25) < 0.04 for c in counts.values())


def test_generate_blockpush_store_validates_and_prints_its_modes(tmp_path, capsys):
    out = tmp_path / "bp.zarr"
    n, start = 4, 8
    assert main(["data", "generate", "blockpush", "--episodes", str(n), "--out", str(out), "--seed", str(start), "--workers", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert main(["data", "validate", str(out), "--task", "none"]) == 0
    capsys.readouterr()
    # checked against a preset's declared task: the sources and shapes it reads, named when wrong
    assert main(["data", "validate", str(out), "--task", "blockpush_smoke"]) == 0
    assert "trains    blockpush_smoke (task blockpush): state [16], action [2]" in capsys.readouterr().out  # fmt: skip
    assert main(["data", "validate", str(out), "--task", "smoke"]) == 1
    said = capsys.readouterr().out
    assert "cannot    train smoke (task pusht)" in said and "missing key data/keypoint" in said
    assert main(["data", "validate", str(out), "--task", "no_such_preset"]) == 2
    buf = ReplayBuffer.load(out)
    assert sorted(buf.keys()) == ["action", "obs"]
    assert buf["obs"].shape[1:] == (16,) and buf["obs"].dtype == np.float32
    assert buf["action"].shape[1:] == (2,) and buf["action"].dtype == np.float32
    assert buf.n_episodes == n and 50 < buf.episode_lengths.min() <= buf.episode_lengths.max() < 350  # fmt: skip
    assert np.abs(buf["action"]).max() <= 0.035 + 1e-6  # the oracle's speed cap at 10 Hz
    # the store's modes are the oracle's plans for those seeds, printed with their counts
    plans = Counter(MultimodalPushOracle(seed=s).mode for s in range(start, start + n))
    assert len(plans) == 4  # these 4 seeds use every mode
    for mode, count in plans.items():
        assert f"{mode} " in printed and f"{count}  {count / n:.3f}" in printed
    assert "p2               1.000" in printed
    # the declared preset trains on it: its task spec fits the store (obs (16,), action (2,))
    cfg = load_config("blockpush_smoke", [f"task.dataset={out}"])
    assert cfg.task.env_id == "BlockPushMultimodal-v0" and gym.spec(cfg.task.env_id)
    assert check_spec(buf, spec_from_config(cfg.task)) == {"state": (16,), "action": (2,)}
