"""LeRobot's own dataset writer and loader, run under the LeRobot venv (scripts/setup_lerobot_venv.sh).

tests/test_convert_lerobot.py drives it as the real peer of `dp data convert/export lerobot`:
    python scripts/_lerobot_dataset_worker.py record GIVEN.npz ROOT FPS VCODEC
        LeRobotDataset.create + add_frame + save_episode records the arrays of GIVEN.npz (keys
        `front`, `wrist` uint8 (N, H, W, 3), `state`, `action` float32 (N, 7), `episode_ends`).
    python scripts/_lerobot_dataset_worker.py load ROOT OUT.npz
        LeRobotDataset(root=ROOT) reads every frame; OUT.npz gets the same keys (images uint8 HWC).
Prints one JSON line with what it did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

CAMERAS = ("front", "wrist")


def record(given: Path, root: Path, fps: int, vcodec: str) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    d = np.load(given)
    h, w = d["front"].shape[1:3]
    features = {
        f"observation.images.{c}": {
            "dtype": "video",
            "shape": (h, w, 3),
            "names": ["height", "width", "channels"],
        }
        for c in CAMERAS
    }
    features["observation.state"] = {"dtype": "float32", "shape": (7,), "names": None}
    features["action"] = {"dtype": "float32", "shape": (7,), "names": None}
    ds = LeRobotDataset.create(
        "local/peer", fps, features=features, root=root, use_videos=True, vcodec=vcodec
    )
    start = 0
    for ep, end in enumerate(d["episode_ends"]):
        for t in range(start, int(end)):
            frame = {f"observation.images.{c}": d[c][t] for c in CAMERAS}
            frame.update({"observation.state": d["state"][t], "action": d["action"][t]})
            ds.add_frame({**frame, "task": f"task {ep % 2}"})
        ds.save_episode(parallel_encoding=False)
        start = int(end)
    ds.finalize()
    return {"episodes": ds.meta.total_episodes, "frames": ds.meta.total_frames}


def load(root: Path, out: Path) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("local/peer", root=root, video_backend="torchcodec")
    cols: dict[str, list] = {c: [] for c in (*CAMERAS, "state", "action", "episode_index")}
    for i in range(len(ds)):
        item = ds[i]
        for c in CAMERAS:
            img = item[f"observation.images.{c}"].numpy()  # (3, H, W) float in [0, 1]
            cols[c].append(np.round(img.transpose(1, 2, 0) * 255).astype(np.uint8))
        cols["state"].append(item["observation.state"].numpy())
        cols["action"].append(item["action"].numpy())
        cols["episode_index"].append(int(item["episode_index"]))
    np.savez(out, **{k: np.stack(v) for k, v in cols.items()})
    return {"episodes": ds.num_episodes, "frames": len(ds), "fps": ds.fps}


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "record":
        report = record(Path(args[0]), Path(args[1]), int(args[2]), args[3])
    elif cmd == "load":
        report = load(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(report))
