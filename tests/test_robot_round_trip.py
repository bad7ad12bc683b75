"""Issue 13's whole path with the real peers: a two-camera dataset written by LeRobot 0.4.4's own
writer (video) -> `dp data convert lerobot` -> `dp train` on a declared task without a simulator ->
`dp serve` -> the unmodified openpi-client sends two camera frames and a 7-d state and gets (Ta, 7)
actions back. Runs in CI, where scripts/setup_lerobot_venv.sh and scripts/setup_openpi_venv.sh build
the peers' venvs; skips, saying why, where they cannot be built."""

from __future__ import annotations

import json
import subprocess

import numpy as np
from declared import train_two_steps
from test_convert_lerobot import FPS, H, W, demo_arrays, lerobot_python, run_peer
from test_serving import openpi_python
from test_serving_hostile import DpServe

from diffusion_policy.cli.main import main

OPENPI_ROBOT = r"""
import json, sys
import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy

url, obs_file = sys.argv[1:3]
policy = WebsocketClientPolicy(host=url)
meta = policy.get_server_metadata()
obs = dict(np.load(obs_file))
out = policy.infer({**obs, "seed": 3})
again = policy.infer({**obs, "seed": 3})
print(json.dumps({"meta": meta, "shape": list(out["actions"].shape),
                  "finite": bool(np.isfinite(out["actions"]).all()),
                  "same": bool(np.array_equal(out["actions"], again["actions"]))}))
"""


def test_lerobot_dataset_to_actions_through_the_openpi_client(tmp_path) -> None:
    lerobot = lerobot_python()
    openpi = openpi_python()
    given = demo_arrays()
    np.savez(tmp_path / "given.npz", **given)
    theirs = tmp_path / "theirs"
    run_peer(lerobot, "record", tmp_path / "given.npz", theirs, FPS, "libsvtav1")

    store = tmp_path / "robot.zarr"
    assert main(["data", "convert", "lerobot", str(theirs), "--out", str(store)]) == 0
    task = {
        "name": "lerobot_two_cameras",
        "dataset": str(store),
        "env_id": None,
        "control_hz": float(FPS),
        "obs": {
            "front": {"kind": "rgb", "source": ["front"], "crop": [H - 8, W - 8]},
            "wrist": {"kind": "rgb", "source": ["wrist"], "crop": [H - 8, W - 8]},
            "state": {"kind": "low_dim", "source": ["state"]},
        },
        "action": {"source": ["action"], "dim": 7},
    }
    run = train_two_steps(tmp_path, task)

    server = DpServe(run / "checkpoints" / "latest", "--max-batch", "1")
    try:
        rng = np.random.default_rng(0)
        obs = {
            "front": rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8),
            "wrist": rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8),
            "state": given["state"][:2],
        }
        np.savez(tmp_path / "obs.npz", **obs)
        (tmp_path / "robot.py").write_text(OPENPI_ROBOT)
        r = subprocess.run(
            [str(openpi), str(tmp_path / "robot.py"), server.url, str(tmp_path / "obs.npz")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr + "".join(server.lines)
    finally:
        assert server.stop() == 0, "".join(server.lines)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    meta = report["meta"]
    assert meta["obs"] == {
        "front": {"shape": [2, H, W, 3], "dtype": "uint8", "kind": "rgb"},
        "wrist": {"shape": [2, H, W, 3], "dtype": "uint8", "kind": "rgb"},
        "state": {"shape": [2, 7], "dtype": "float32", "kind": "low_dim"},
    }
    assert meta["action_dim"] == 7 and meta["task"]["env_id"] is None
    assert report["shape"] == [meta["n_action_steps"], 7]
    assert report["finite"] and report["same"]
