"""serving/recorder.py: whole episodes or nothing, even when the recording process is SIGKILLed."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from declared import train_two_steps

from diffusion_policy.cli.main import main
from diffusion_policy.data.replay_buffer import ReplayBuffer, validate
from diffusion_policy.errors import DataError
from diffusion_policy.serving.recorder import EpisodeRecorder

REPO = Path(__file__).resolve().parents[1]

# the frames of episode e, shared by this process and the recording child
FRAMES = """
import numpy as np

def length(e):
    return 3 + e

def frame(e, t):
    rng = np.random.default_rng(1000 * e + t)
    obs = {
        "front": rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8),
        "eef_pos": rng.normal(size=3).astype(np.float32),
        "gripper": np.array([t / 10], dtype=np.float32),
    }
    return obs, np.array([e, t], dtype=np.float32)
"""
_ns: dict = {}
exec(FRAMES, _ns)
length, frame = _ns["length"], _ns["frame"]

# Records episode `start` (the store's episode count) and dies at a kill point:
#   mid-episode N: after N frames;  resize N: before the N-th zarr resize of the commit (4 data
#   arrays, then episode_ends as the 5th);  write N: half-way through the N-th file zarr writes.
CHILD = (
    FRAMES
    + """
import os, signal, sys
import zarr
import zarr.storage._local as local
from diffusion_policy.serving.recorder import EpisodeRecorder

path, point, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
rec = EpisodeRecorder(path)
e = rec.n_episodes
for t in range(n if point == "mid-episode" else length(e)):
    rec.add(*frame(e, t))
calls = [0]
if point == "mid-episode":
    die()
if point == "resize":
    resize = zarr.Array.resize
    def counted(self, shape):
        calls[0] += 1
        if calls[0] == n:
            die()
        return resize(self, shape)
    zarr.Array.resize = counted
if point == "write":
    put = local._put
    def half(p, value, exclusive=False):
        calls[0] += 1
        if calls[0] == n:  # what zarr's atomic write leaves when killed mid-file
            data = bytes(value.as_buffer_like())
            p.parent.mkdir(parents=True, exist_ok=True)
            p.with_suffix("." + "ab" * 16 + ".partial").write_bytes(data[: len(data) // 2])
            die()
        return put(p, value, exclusive)
    local._put = half
rec.end_episode()
die()  # after the commit
"""
)


def _record(path: Path, episodes: range) -> None:
    with EpisodeRecorder(path) as rec:
        for e in episodes:
            for t in range(length(e)):
                rec.add(*frame(e, t))
            assert rec.end_episode() == e


def _kill(path: Path, point: str, n: int) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), point, str(n)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr


def _assert_holds(path: Path, n_episodes: int) -> None:
    """Valid, and exactly episodes 0..n-1, frame for frame."""
    assert validate(path) == []
    buf = ReplayBuffer.load(path)
    assert buf.episode_lengths.tolist() == [length(e) for e in range(n_episodes)]
    assert sorted(buf.keys()) == ["action", "eef_pos", "front", "gripper"]
    for e in range(n_episodes):
        ep = buf.get_episode(e)
        for t in range(length(e)):
            obs, action = frame(e, t)
            for k, v in {**obs, "action": action}.items():
                np.testing.assert_array_equal(ep[k][t], v)


@pytest.mark.parametrize(
    "point, n, committed, repaired",
    [
        ("mid-episode", 2, False, False),
        ("resize", 1, False, False),  # every new chunk written, no length changed yet
        ("resize", 2, False, True),  # one data array grown
        ("resize", 5, False, True),  # all data grown, episode_ends not: the commit point
        ("resize", 6, True, False),  # no 6th resize: killed after the commit
        ("write", 1, False, True),  # half a data chunk in a zarr temp file
        ("write", 6, False, True),  # half an array's metadata, one data array grown
        ("write", 9, False, True),  # half of episode_ends' new chunk (its value, beyond its length)
        ("write", 10, False, True),  # half of episode_ends' metadata: the commit point itself
    ],
)
def test_sigkill_leaves_only_committed_episodes(tmp_path, point, n, committed, repaired):
    store = tmp_path / "robot.zarr"
    _record(store, range(2))
    _kill(store, point, n)
    held = 3 if committed else 2
    if not repaired:  # valid as the kill left it
        assert validate(store) == []
    with EpisodeRecorder(store) as rec:  # repairs what a killed commit left, before anything else
        assert bool(rec.recovered) == repaired, rec.recovered
        assert rec.n_episodes == held
    _assert_holds(store, held)
    _record(store, range(held, held + 1))  # appending after the repair: no stale frames leak in
    _assert_holds(store, held + 1)
    assert main(["data", "validate", str(store), "--task", "none"]) == 0


def test_sigkill_in_the_first_commit_leaves_no_store(tmp_path):
    store = tmp_path / "robot.zarr"
    _kill(store, "resize", 1)
    assert not store.exists() and list(tmp_path.glob(".robot.zarr.*.partial"))
    _record(store, range(1))
    assert not list(tmp_path.glob(".robot.zarr.*.partial"))  # the killed first commit cleaned up
    _assert_holds(store, 1)


def test_shapes_dtypes_and_values_stay_consistent(tmp_path):
    store = tmp_path / "robot.zarr"
    rec = EpisodeRecorder(store)
    obs, action = frame(0, 0)
    rec.add(obs, action)
    with pytest.raises(DataError, match=r"step 1: eef_pos: shape \(4,\) float32, but this episode's first step has \(3,\) float32"):  # fmt: skip
        rec.add({**obs, "eef_pos": np.zeros(4, np.float32)}, action)
    with pytest.raises(DataError, match=r"step 1: data/gripper: 1 NaN/Inf value\(s\), first at frame 1"):  # fmt: skip
        rec.add({**obs, "gripper": np.array([np.nan], np.float32)}, action)
    with pytest.raises(DataError, match=r"step 1: keys .* differ"):
        rec.add({"front": obs["front"]}, action)
    with pytest.raises(DataError, match="clashes with the action key"):
        rec.add({**obs, "action": action}, action)
    assert rec.n_pending == 1  # refused frames lose nothing
    with pytest.raises(DataError, match="another recorder is writing"):
        EpisodeRecorder(store)
    assert rec.end_episode() == 0 and rec.end_episode() is None
    rec.close()
    with EpisodeRecorder(store) as rec:  # the store now fixes shapes and dtypes
        with pytest.raises(DataError, match=r"front: shape \(8, 8, 3\) float32, but the store has \(8, 8, 3\) uint8"):  # fmt: skip
            rec.add({**obs, "front": obs["front"].astype(np.float32)}, action)
        rec.add(obs, action)
        assert rec.discard_episode() == 1
    with pytest.raises(RuntimeError), EpisodeRecorder(store) as rec:
        rec.add(obs, action)
        raise RuntimeError("the robot stopped")  # an exception discards the unfinished episode
    assert ReplayBuffer.load(store).n_episodes == 1


def test_recorder_imports_no_torch():
    code = (
        "import sys; import diffusion_policy.serving.recorder; "
        "bad = [m for m in ('torch', 'diffusers', 'gymnasium') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# needs the declared task spec (issue 13 item 1)
def test_recorded_store_trains(tmp_path):
    """Episodes from the recorder feed `dp train` directly (no simulator: offline validation)."""
    store = tmp_path / "robot.zarr"
    _record(store, range(4))
    task = {
        "name": "my_robot",
        "dataset": str(store),
        "env_id": None,
        "control_hz": 10.0,
        "obs": {
            "front": {"kind": "rgb", "source": ["front"], "crop": [8, 8]},
            "state": {"kind": "low_dim", "source": ["eef_pos", "gripper[0:1]"]},
        },
        "action": {"source": ["action"]},
    }
    train_two_steps(tmp_path, task)
