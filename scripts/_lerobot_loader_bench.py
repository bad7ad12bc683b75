"""LeRobot 0.4.4's loader on a LeRobotDataset, timed; run under the LeRobot venv by bench_ondisk.py.

    python scripts/_lerobot_loader_bench.py ROOT BATCH WORKERS STEPS WARMUP FPS

LeRobotDataset with delta_timestamps for 2 observation frames (both cameras and the state) and 16
actions, as a Diffusion Policy with n_obs_steps 2 and horizon 16 asks, through a shuffled torch
DataLoader (video_backend torchcodec, LeRobot's default where it is installed). Prints one JSON
line: samples/s over STEPS batches after WARMUP, the main process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch


def main(root: str, batch: int, workers: int, steps: int, warmup: int, fps: int) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    torch.set_num_threads(1)
    obs = [-1 / fps, 0.0]
    keys = ["observation.images.front", "observation.images.wrist", "observation.state"]
    delta = {k: obs for k in keys}
    delta["action"] = [(i - 1) / fps for i in range(16)]  # the window starts at the first obs
    t0 = time.time()
    ds = LeRobotDataset(
        "local/bench", root=root, delta_timestamps=delta, video_backend="torchcodec"
    )
    setup_s = time.time() - t0
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
        generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0,
    )  # fmt: skip
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(steps):
        b = next(it)
    dt = time.perf_counter() - t
    return {"samples_per_s": steps * batch / dt, "setup_s": setup_s, "windows": len(ds),
            "shapes": {k: list(b[k].shape) for k in [*keys, "action"]},
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


if __name__ == "__main__":
    root, *nums = sys.argv[1:]
    print(json.dumps(main(root, *(int(x) for x in nums))))
