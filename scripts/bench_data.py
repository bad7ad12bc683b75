"""Samples/s of PushTDataset.get_batch (CPU, and CUDA if present) vs a torch DataLoader over __getitem__.

.venv/bin/python scripts/bench_data.py [--path STORE] [--seconds 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from diffusion_policy.data.datasets import make_pusht_datasets

DEFAULT_PATH = "../shared/data/pusht/pusht_cchi_v7_replay.zarr"
BATCH = {"state": 256, "keypoints": 256, "pixels_agent_pos": 64}


def rate(step, batch: int, seconds: float, sync=lambda: None) -> float:
    step()  # warm up
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--path", default=DEFAULT_PATH)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; horizon 16, To 2, Ta 8\n")
    print(f"| {'obs_type':<17} | {'batch':>5} | {'method':<34} | {'samples/s':>10} |")
    print(f"|{'-' * 19}|{'-' * 7}|{'-' * 36}|{'-' * 12}|")
    for obs_type, batch in BATCH.items():
        for method, r in bench_one(args.path, obs_type, batch, args.seconds):
            print(f"| {obs_type:<17} | {batch:>5} | {method:<34} | {r:>10,.0f} |")


def bench_one(path: str, obs_type: str, batch: int, seconds: float) -> list[tuple[str, float]]:
    ds, _ = make_pusht_datasets(path, obs_type, 16, 2, 8)
    gen = torch.Generator().manual_seed(0)
    rows = [
        (
            "get_batch, cpu",
            rate(
                lambda: ds.get_batch(torch.randint(len(ds), (batch,), generator=gen)),
                batch,
                seconds,
            ),
        )
    ]
    if torch.cuda.is_available():
        ds.to("cuda")
        step = lambda: ds.get_batch(torch.randint(len(ds), (batch,), device="cuda"))  # noqa: E731
        rows.append(
            (
                "get_batch, cuda (dataset resident)",
                rate(step, batch, seconds, torch.cuda.synchronize),
            )
        )
        ds.to("cpu")
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)
    it = iter(loader)

    def next_batch() -> None:
        nonlocal it
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)

    rows.append(("DataLoader(__getitem__), 0 workers", rate(next_batch, batch, seconds)))
    return rows


if __name__ == "__main__":
    main()
