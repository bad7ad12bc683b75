"""Shared fixtures. The published Push-T demonstrations live in ../shared/data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("WANDB_MODE", "disabled")
# as `make test`: a fixed torch thread count (threads.py adapts only an unset one), so the tests that
# compare two runs bit for bit stay exact beside other workers, and one thread per xdist worker
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
PUSHT_ZARR = Path(
    os.environ.get(
        "DP_PUSHT_ZARR", REPO_ROOT.parent / "shared/data/pusht/pusht_cchi_v7_replay.zarr"
    )
)


@pytest.fixture(scope="session")
def pusht_zarr() -> Path:
    """Path of the real Push-T store; skips (with the reason) only where it is absent. CI has it."""
    if not PUSHT_ZARR.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-data tests, but {PUSHT_ZARR} is missing")
        pytest.skip(f"real Push-T demonstrations not found at {PUSHT_ZARR} (set DP_PUSHT_ZARR)")
    return PUSHT_ZARR


@pytest.fixture(scope="session")
def pusht_images(pusht_zarr: Path):
    """Every key of the real store, img included, loaded once per session (about 4 s, 2.8 GB of RAM)."""
    from diffusion_policy.data.replay_buffer import ReplayBuffer

    return ReplayBuffer.load(pusht_zarr)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors run faster on one intra-op thread, and it is cheaper on a shared CI machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
