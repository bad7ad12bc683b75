"""Evaluation metrics, chunked execution, progress, and env workers that crash, hang, stop or die."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401
from diffusion_policy.chunking import ObsHistory
from diffusion_policy.config import EvalConfig, TaskConfig
from diffusion_policy.evaluation.metrics import summarize
from diffusion_policy.evaluation.rollout import EvalError, evaluate
from envs.pusht import PushTEnv


class HoldStill:
    """Targets the agent's own position: nothing moves, so coverage stays at its initial value."""

    n_obs_steps = 2

    def __call__(self, obs):
        return np.repeat(obs["keypoints"][:, -1:, 18:20], 8, axis=1)


class CrashingEnv(PushTEnv):
    """Fails at its third step: raises, exits, stops (SIGSTOP) or kills (SIGKILL) its own process.

    With `pid_dir`, each worker leaves a file named after its pid, so a test can check that none
    outlives the evaluation."""

    def __init__(self, mode: str = "raise", pid_dir: str | None = None, **kw):
        super().__init__(**kw)
        self.mode, self.n = mode, 0
        if pid_dir:
            (Path(pid_dir) / str(os.getpid())).touch()

    def step(self, action):
        self.n += 1
        if self.n == 3:
            if self.mode == "raise":
                raise RuntimeError("simulated physics failure")
            if self.mode == "die":
                os._exit(1)  # the worker process dies without a word
            os.kill(os.getpid(), {"stop": signal.SIGSTOP, "kill": signal.SIGKILL}[self.mode])
        return super().step(action)


gym.register("CrashingPushT-v0", entry_point=CrashingEnv, max_episode_steps=300)


class EndsEarlyEnv(PushTEnv):
    """Terminates after 3 + (seed % 4) steps, so the envs of one batch finish at different times."""

    def reset(self, *, seed=None, options=None):
        self.left = 3 + (seed or 0) % 4
        return super().reset(seed=seed, options=options)

    def step(self, action):
        obs, r, term, trunc, info = super().step(action)
        self.left -= 1
        return obs, r, term or self.left <= 0, trunc, info


gym.register("EndsEarlyPushT-v0", entry_point=EndsEarlyEnv, max_episode_steps=300)


@pytest.mark.parametrize("vector", ["sync", "async"])
def test_episodes_that_end_at_different_times(vector):
    task = TaskConfig(env_id="EndsEarlyPushT-v0", obs_type="keypoints")
    m = evaluate(
        HoldStill(),
        task,
        EvalConfig(n_episodes=4, max_steps=50, vector=vector, n_videos=0),
        progress=False,
    )
    assert [m["per_seed"][str(100000 + i)]["steps"] for i in range(4)] == [
        3 + (100000 + i) % 4 for i in range(4)
    ]


def test_hold_still_scores_its_initial_coverage():
    task = TaskConfig(obs_type="keypoints")
    m = evaluate(
        HoldStill(),
        task,
        EvalConfig(n_episodes=3, max_steps=12, vector="sync", n_videos=0),
        progress=False,
    )
    assert m["n_episodes"] == 3 and set(m["per_seed"]) == {"100000", "100001", "100002"}
    for seed, r in m["per_seed"].items():
        env = gym.make("PushT-v0", obs_type="keypoints")
        _, info = env.reset(seed=int(seed))
        assert r["steps"] == 12
        assert r["final_coverage"] == pytest.approx(info["coverage"], abs=0.02)
        assert r["max_reward"] == pytest.approx(min(1.0, info["coverage"] / 0.95), abs=0.02)
    lo, hi = m["mean_score_ci95"]
    assert 0.0 <= lo <= m["mean_score"] <= hi <= 1.0


def test_waves_give_the_same_result_as_one_batch():
    task = TaskConfig(obs_type="keypoints")
    one = evaluate(
        HoldStill(),
        task,
        EvalConfig(n_episodes=4, max_steps=8, vector="sync", n_videos=0),
        progress=False,
    )
    waves = evaluate(
        HoldStill(),
        task,
        EvalConfig(n_episodes=4, max_steps=8, vector="sync", n_envs=3, n_videos=0),
        progress=False,
    )
    assert one["per_seed"] == waves["per_seed"]


def test_summary_statistics():
    rows = [
        {"max_reward": r, "success": ok, "final_coverage": c, "steps": k}
        for r, ok, c, k in zip(
            [1.0, 0.5, 0.0, 1.0],
            [True, False, False, True],
            [0.96, 0.4, 0.0, 0.97],
            [50, 300, 300, 80],
        )
    ]
    m = summarize([1, 2, 3, 4], rows)
    assert m["mean_score"] == 0.625 and m["success_rate"] == 0.5
    assert m["mean_final_coverage"] == pytest.approx(0.5825)
    lo, hi = m["success_rate_ci95"]
    assert 0.0 < lo < 0.5 < hi < 1.0


def test_events_and_modes_come_from_the_env_metadata():
    """Block Pushing's p1/p2 and modes: rates from the events reached at any step, the mode
    frequencies over episodes, and no coverage metrics for an env without info["coverage"]."""
    from diffusion_policy.evaluation.metrics import EpisodeStats

    meta = {"success_key": "is_success", "event_keys": ("p1", "p2"), "mode_key": "mode"}
    stats = EpisodeStats(3, meta, {})
    live = np.ones(3, bool)
    stats.step(
        np.array([0.0, 0.5, 0.0]),
        {"is_success": np.array([False] * 3), "p1": np.array([True, True, False]),
         "p2": np.array([False] * 3), "mode": np.array(["a", "b", ""], dtype=object)},
        live,
    )  # fmt: skip
    stats.step(
        np.array([1.0, 0.0, 0.0]),
        {"is_success": np.array([True, False, False]), "p1": np.array([False] * 3),
         "p2": np.array([True, False, False]), "mode": np.array(["a", "b", ""], dtype=object)},
        np.array([True, True, False]),
    )  # fmt: skip
    m = summarize([7, 8, 9], stats.rows())
    assert m["p1_rate"] == pytest.approx(2 / 3) and m["p2_rate"] == pytest.approx(1 / 3)
    assert m["success_rate"] == pytest.approx(1 / 3) and m["mean_score"] == pytest.approx(0.5)
    assert m["mode_frequencies"] == {
        "a": pytest.approx(1 / 3),
        "b": pytest.approx(1 / 3),
        "none": pytest.approx(1 / 3),
    }
    assert "mean_final_coverage" not in m and m["per_seed"]["9"]["steps"] == 1
    with pytest.raises(KeyError, match="is_success"):
        stats.step(np.zeros(3), {}, live)


def _crashing_env_factory(monkeypatch, **env_kwargs) -> None:
    import diffusion_policy.evaluation.rollout as ev

    def make(env_id, obs_type, max_steps, video_size):
        env = gym.make(
            env_id,
            obs_type=obs_type,
            render_mode="rgb_array",
            max_episode_steps=max_steps,
            **env_kwargs,
        )
        return ev.VideoRecorder(env)

    monkeypatch.setattr(ev, "make_env", make)


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)  # the dead worker's pipe
@pytest.mark.parametrize("mode", ["raise", "die"])
def test_crashed_env_worker_is_reported_not_waited_on(mode, monkeypatch):
    task = TaskConfig(env_id="CrashingPushT-v0", obs_type="keypoints")
    cfg = EvalConfig(n_episodes=2, max_steps=20, vector="async", n_videos=0, worker_timeout_s=20)
    _crashing_env_factory(monkeypatch, mode=mode)
    with pytest.raises(EvalError, match="env worker"):
        evaluate(HoldStill(), task, cfg, progress=False)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("mode", ["stop", "kill"])
def test_stopped_or_killed_env_worker_is_reported_and_its_processes_ended(
    mode, monkeypatch, tmp_path
):
    """Issue 17 item 6: gymnasium's close() waited forever on a stopped or killed worker's pipe."""
    task = TaskConfig(env_id="CrashingPushT-v0", obs_type="keypoints")
    cfg = EvalConfig(n_episodes=3, max_steps=20, vector="async", n_videos=0, worker_timeout_s=2)
    _crashing_env_factory(monkeypatch, mode=mode, pid_dir=str(tmp_path))
    raised: list[BaseException] = []

    def run() -> None:
        try:
            evaluate(HoldStill(), task, cfg, progress=False)
        except BaseException as e:
            raised.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(120)  # generous: a hang is forever, the fix takes about worker_timeout_s
    # gymnasium builds one env in this process too, to read the spaces
    pids = [int(p.name) for p in tmp_path.iterdir() if int(p.name) != os.getpid()]
    alive = [pid for pid in pids if _running(pid)]
    for pid in alive:  # never leave a stopped process behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not th.is_alive(), "evaluation hung on a stopped or killed env worker"
    assert len(pids) == 3 and not alive
    assert len(raised) == 1 and isinstance(raised[0], EvalError)
    assert "env worker" in str(raised[0]) and "\n" not in str(raised[0])
    if mode == "kill":
        assert "SIGKILL" in str(raised[0])


def _running(pid: int) -> bool:
    """Alive and not a zombie (an unreaped worker counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_progress_moves_every_env_step_within_one_wave():
    """The default one wave of every episode used to show 0/N until it ended."""
    task = TaskConfig(env_id="EndsEarlyPushT-v0", obs_type="keypoints")
    calls: list[tuple[int, int]] = []
    evaluate(
        HoldStill(),
        task,
        EvalConfig(n_episodes=4, max_steps=50, vector="sync", n_videos=0),
        progress=lambda steps, episodes: calls.append((steps, episodes)),
    )
    # the longest of the four episodes is 6 steps: one report per step of the one wave
    assert len(calls) == 6
    assert calls == sorted(calls) and calls[0][1] == 0
    assert calls[-1] == (4 * 50, 4)


def test_obs_history_pads_with_the_first_frame():
    h = ObsHistory(3, time_axis=1)
    h.reset({"x": np.array([[1.0], [2.0]])})
    assert h.stacked()["x"].shape == (2, 3, 1)
    assert (h.stacked()["x"][:, :, 0] == [[1, 1, 1], [2, 2, 2]]).all()
    h.push({"x": np.array([[5.0], [6.0]])})
    assert (h.stacked()["x"][:, :, 0] == [[1, 1, 5], [2, 2, 6]]).all()
    for v in (7.0, 8.0):
        h.push({"x": np.array([[v], [v]])})
    assert (h.stacked()["x"][0, :, 0] == [5, 7, 8]).all()
