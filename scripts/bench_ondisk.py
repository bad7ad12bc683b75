"""Larger-than-memory training data: our on-disk path against our resident path and LeRobot's loader.

    .venv/bin/python scripts/bench_ondisk.py                 # the 10 GB run (~20 min the first time)
    .venv/bin/python scripts/bench_ondisk.py --gb 0.5        # a quick check on a 0.5 GB store

(a) A synthetic two-camera store in the replay-buffer layout (data/front, data/wrist uint8
    (N, 240, 320, 3), data/state and data/action float32 (N, 7), meta/episode_ends), time-only
    chunks as replay_buffer.get_optimal_chunks sizes them (9 frames = 2 MB per image chunk), Blosc
    lz4 (clevel 1, no shuffle) + crc32c. Each episode's camera is a crop that drifts across a smooth
    random texture with a little fixed pixel noise: cheap to make, video-like for the encoder, and
    incompressible for lz4, so the store really takes --gb GB on disk.
(b) The same frames as a LeRobotDataset v3.0, written by our `dp data export lerobot --vcodec h264`
    (H.264 encodes several times faster than SVT-AV1 here and LeRobot decodes both; key frame every
    2 frames, LeRobot's own setting), so both loaders read the same frames.
(c) Each loader runs in its own process, so its peak memory is its own: samples/s over --steps
    batches of --batch windows (To = 2 frames per camera, 16 actions), after --warmup batches, and
    the peak RSS summed over the process and its DataLoader workers (sampled from /proc every 0.1 s;
    shared pages count once per process, so with workers it overstates a little), besides the main
    process's own peak (ru_maxrss). LeRobot runs in its own venv (scripts/setup_lerobot_venv.sh)
    through scripts/_lerobot_loader_bench.py.

Both files are cached under .bench/ondisk/ (git-ignored) and reused while --gb and the generator
version match.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench" / "ondisk"
LEROBOT_PY = Path(
    os.environ.get("DP_LEROBOT_PYTHON", REPO / ".bench" / "lerobot" / ".venv" / "bin" / "python")
)  # a worktree can point it at the main checkout's venv
LEROBOT_WORKER = REPO / "scripts" / "_lerobot_loader_bench.py"
H, W = 240, 320
CAMERAS = ("front", "wrist")
EP_LEN = 200
FPS = 10
VERSION = 1  # bump when the generator changes: cached stores of other versions are rebuilt
HORIZON, N_OBS, N_ACT = 16, 2, 8


# ------------------------------------------------------------------------------------------- store
def _texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth (2H, 2W, 3) uint8 texture (bicubic upsampled 8 x 10 random grid) + fixed noise 0..3."""
    import torch

    grid = torch.from_numpy(rng.uniform(0, 255, (1, 3, 8, 10)).astype(np.float32))
    tex = torch.nn.functional.interpolate(grid, size=(2 * H, 2 * W), mode="bicubic")
    tex = tex[0].permute(1, 2, 0).numpy() + rng.integers(0, 4, (2 * H, 2 * W, 3))
    return np.clip(tex, 0, 255).astype(np.uint8)


def _episode(ep: int) -> dict[str, np.ndarray]:
    """Episode `ep` of the synthetic store (deterministic in ep)."""
    rng = np.random.default_rng(1000 + ep)
    t = np.arange(EP_LEN)
    out = {}
    for c in CAMERAS:
        tex = _texture(rng)
        phase = rng.uniform(0, 2 * np.pi, 2)
        y = ((np.sin(t / 37 + phase[0]) + 1) / 2 * (H - 1)).astype(int)
        x = ((np.sin(t / 53 + phase[1]) + 1) / 2 * (W - 1)).astype(int)
        out[c] = np.stack([tex[a : a + H, b : b + W] for a, b in zip(y, x)])
    walk = np.cumsum(rng.normal(0, 0.05, (EP_LEN + 1, 7)), axis=0).astype(np.float32)
    out["state"], out["action"] = walk[:-1], walk[1:]
    return out


def write_store(path: Path, gb: float) -> dict[str, Any]:
    """The synthetic store of about `gb` GB (raw = on disk: lz4 finds nothing to squeeze)."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    from diffusion_policy.data.replay_buffer import get_optimal_chunks

    frame_bytes = len(CAMERAS) * H * W * 3
    n_eps = max(4, round(gb * 1e9 / (frame_bytes * EP_LEN)))
    n = n_eps * EP_LEN
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    g = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
    codecs = (BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle"), Crc32cCodec())
    shapes = {**{c: (H, W, 3) for c in CAMERAS}, "state": (7,), "action": (7,)}
    arrays = {}
    for k, s in shapes.items():
        dtype = np.uint8 if len(s) == 3 else np.float32
        chunks = get_optimal_chunks((n, *s), np.dtype(dtype).itemsize)
        arrays[k] = g.require_group("data").create_array(
            k, shape=(n, *s), dtype=dtype, chunks=chunks, fill_value=0, compressors=codecs
        )
    # write whole image chunks at a time: blocks of a multiple of the chunk length
    step = arrays[CAMERAS[0]].chunks[0] * 50
    pending: dict[str, list[np.ndarray]] = {k: [] for k in shapes}
    written, t0 = 0, time.time()
    for ep in range(n_eps):
        for k, v in _episode(ep).items():
            pending[k].append(v)
        have = (ep + 1) * EP_LEN - written
        if have >= step or ep == n_eps - 1:
            m = have if ep == n_eps - 1 else have // step * step
            for k in shapes:
                block = np.concatenate(pending[k])
                arrays[k][written : written + m] = block[:m]
                pending[k] = [block[m:]]
            written += m
            print(f"\r  store: {written}/{n} frames, {time.time() - t0:.0f} s", end="", flush=True)
    print()
    ends = np.arange(1, n_eps + 1, dtype=np.int64) * EP_LEN
    e = g.require_group("meta").create_array(
        "episode_ends", shape=ends.shape, dtype="int64", chunks=(4096,), compressors=codecs
    )
    e[...] = ends
    tmp.rename(path)
    return {"episodes": n_eps, "frames": n}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ensure_data(gb: float) -> tuple[Path, Path]:
    """The cached store and its LeRobot export for `gb`, made when missing."""
    tag = f"v{VERSION}_{gb:g}gb"
    store, lerobot = BENCH / f"store_{tag}.zarr", BENCH / f"lerobot_{tag}"
    BENCH.mkdir(parents=True, exist_ok=True)
    if not store.exists():
        t = time.time()
        info = write_store(store, gb)
        print(f"wrote {store}: {info}, {du(store) / 1e9:.2f} GB, {time.time() - t:.0f} s")
    if not lerobot.exists():
        t = time.time()
        cmd = [sys.executable, "-m", "diffusion_policy.cli", "data", "export", "lerobot",
               str(store), "--out", str(lerobot), "--vcodec", "h264", "--fps", str(FPS)]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        print(f"exported {lerobot}: {du(lerobot) / 1e9:.2f} GB, {time.time() - t:.0f} s")
    return store, lerobot


# ------------------------------------------------------------------------------------------- ours
def _spec():
    from diffusion_policy.data.task_spec import KeySpec, Source, TaskSpec

    obs = {c: KeySpec(f"task.obs.{c}", "rgb", (Source(c),)) for c in CAMERAS}
    obs["state"] = KeySpec("task.obs.state", "low_dim", (Source("state"),))
    return TaskSpec(obs, KeySpec("task.action", "low_dim", (Source("action"),)), "bench")


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """One of our loaders in this process: {samples_per_s, ...}."""
    import torch

    from diffusion_policy.data.datasets import OnDiskDataset, ReplayDataset
    from diffusion_policy.data.replay_buffer import ReplayBuffer
    from diffusion_policy.training.build import Dist, batch_indices

    torch.set_num_threads(1)
    buf = ReplayBuffer.open(args.store, "r")
    mask = None
    if args.episodes:
        mask = np.zeros(buf.n_episodes, dtype=bool)
        mask[: args.episodes] = True
    t0 = time.time()
    if args.mode == "resident":
        if args.episodes:  # only these episodes' frames in RAM
            end = int(buf.episode_ends[args.episodes - 1])
            data = {k: buf[k][:end] for k in buf.keys()}
            buf = ReplayBuffer(data, buf.episode_ends[: args.episodes])
            mask = None
        ds = ReplayDataset(buf, _spec(), HORIZON, N_OBS, N_ACT, mask)
    else:
        ds = OnDiskDataset(buf, _spec(), HORIZON, N_OBS, N_ACT, mask, **_ondisk_kw(args))
    setup_s = time.time() - t0
    n, b = len(ds), args.batch

    def indices(step: int) -> torch.Tensor:
        return batch_indices(n, b, step, 0, Dist(), "cpu")

    total = args.warmup + args.steps
    if args.mode == "ondisk" and args.workers == 0:
        ds.follow(indices, depth=max(args.depth, args.threads), threads=args.threads)
        batches = (ds.get_batch(indices(s)) for s in range(total))
    elif args.mode == "ondisk":  # the alternative to the thread: each worker reads whole batches
        loader = torch.utils.data.DataLoader(
            _StepBatches(ds, indices), batch_size=None, sampler=range(total),
            num_workers=args.workers, prefetch_factor=args.depth,
        )  # fmt: skip
        batches = iter(loader)
    else:
        batches = (ds.get_batch(indices(s)) for s in range(total))
    for _ in range(args.warmup):
        next(batches)
    t = time.perf_counter()
    for _ in range(args.steps):
        batch = next(batches)
    dt = time.perf_counter() - t
    shapes = {k: list(v.shape) for k, v in batch["obs"].items()}
    return {"samples_per_s": args.steps * b / dt, "setup_s": setup_s, "windows": n,
            "shapes": shapes, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


class _StepBatches:
    """Map-style dataset of whole batches, step -> get_batch(indices(step)), for DataLoader workers."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, indices

    def __getitem__(self, step: int):
        return self.ds.get_batch(self.indices(step))


def _ondisk_kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"cache_mb": args.cache_mb}


# ------------------------------------------------------------------------------------------- driver
def _tree_rss(pid: int) -> int:
    """Summed VmRSS (bytes) of pid and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one loader process; its JSON line plus the peak summed RSS of its process tree."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or ["?"])[-1]}
    result = json.loads(out.strip().splitlines()[-1])
    result["tree_rss_mb"] = peak[0] / 2**20
    return result


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=10.0, help="store size in GB (default 10)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (LeRobot and ours)")
    p.add_argument("--steps", type=int, default=30, help="timed batches per loader")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--depth", type=int, default=2, help="batches the prefetch thread reads ahead")
    p.add_argument("--threads", type=int, default=1, help="prefetch threads (each reads a batch)")
    p.add_argument("--cache-mb", type=int, default=0, help="LRU of decoded chunks (0: none)")
    p.add_argument("--resident-gb", type=float, default=2.0, help="subset for the resident row")
    p.add_argument("--no-lerobot", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    # internal: one of our loaders in this process
    p.add_argument("--ours", choices=["ondisk", "resident"], default=None, dest="mode")
    p.add_argument("--store", default=None)
    p.add_argument("--episodes", type=int, default=0)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_ours(args)))
        return
    store, lerobot = ensure_data(args.gb)
    import zarr

    n_eps = zarr.open_group(str(store), mode="r")["meta/episode_ends"].shape[0]
    frames_gb = du(store) / 1e9
    print(f"store {store} ({frames_gb:.2f} GB on disk, {n_eps} episodes); LeRobot {lerobot} "
          f"({du(lerobot) / 1e9:.2f} GB); MemAvailable {mem_available() / 1e9:.1f} GB; "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    me = [sys.executable, __file__, "--store", str(store), "--batch", str(args.batch),
          "--steps", str(args.steps), "--warmup", str(args.warmup), "--depth", str(args.depth),
          "--cache-mb", str(args.cache_mb)]  # fmt: skip
    rows: list[tuple[str, dict[str, Any]]] = []
    rows.append(("ours on-disk, prefetch thread", measure([*me, "--ours", "ondisk", "--workers", "0"], env)))  # fmt: skip
    rows.append(("ours on-disk, 2 prefetch threads", measure([*me, "--ours", "ondisk", "--workers", "0", "--threads", "2"], env)))  # fmt: skip
    rows.append((f"ours on-disk, DataLoader {args.workers} workers",
                 measure([*me, "--ours", "ondisk", "--workers", str(args.workers)], env)))  # fmt: skip
    from diffusion_policy.data.ondisk import RESIDENT_FRACTION

    if frames_gb > RESIDENT_FRACTION * mem_available() / 1e9:
        rows.append((f"ours resident, all {frames_gb:.1f} GB", {"error": f"does not fit: {frames_gb:.1f} GB > "
                     f"{RESIDENT_FRACTION:.0%} of {mem_available() / 1e9:.1f} GB available (auto picks on-disk)"}))  # fmt: skip
    else:
        rows.append(("ours resident, all", measure([*me, "--ours", "resident"], env)))
    sub = max(1, min(n_eps, round(args.resident_gb / frames_gb * n_eps)))
    if sub < n_eps:
        gb = frames_gb * sub / n_eps
        rows.append((f"ours resident, {gb:.1f} GB subset", measure([*me, "--ours", "resident", "--episodes", str(sub)], env)))  # fmt: skip
        rows.append((f"ours on-disk thread, same {gb:.1f} GB subset", measure([*me, "--ours", "ondisk", "--workers", "0", "--episodes", str(sub)], env)))  # fmt: skip
    if not args.no_lerobot:
        if not LEROBOT_PY.exists():
            rows.append(("LeRobot 0.4.4", {"error": f"no LeRobot venv at {LEROBOT_PY}"}))
        for w in dict.fromkeys([args.workers, 0]):
            cmd = [str(LEROBOT_PY), str(LEROBOT_WORKER), str(lerobot), str(args.batch), str(w),
                   str(args.steps), str(args.warmup), str(FPS)]  # fmt: skip
            if LEROBOT_PY.exists():
                rows.append((f"LeRobot 0.4.4 LeRobotDataset, DataLoader {w} workers", measure(cmd, {**env, "PYTHONPATH": ""})))  # fmt: skip
    print(f"\nbatch {args.batch}, To={N_OBS} frames x {len(CAMERAS)} cameras of {H}x{W}, {HORIZON} actions; "
          f"{args.steps} timed batches after {args.warmup}; load {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| loader | samples/s | peak RSS, process tree (MB) | peak RSS, main process (MB) |")
    print("|---|---:|---:|---:|")
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | {r['error']} | | |")
        else:
            print(f"| {name} | {r['samples_per_s']:.0f} | {r['tree_rss_mb']:.0f} | {r['maxrss_mb']:.0f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
