"""Our Diffusion Policy against LeRobot's DiffusionPolicy, side by side, same sizes, batch and episodes.

    .venv/bin/python scripts/bench_lerobot.py                      # ours + LeRobot (venv made on first use)
    .venv/bin/python scripts/bench_lerobot.py --no-theirs          # ours only
    .venv/bin/python scripts/bench_lerobot.py --json out.json --steps 20 --repeats 3

Measured, each side with its own data pipeline and training step:
  1. training samples/s, state preset (configs/pusht_diffusion_state_cpu.yaml sizes; keypoints);
  2. training samples/s, image preset (configs/pusht_diffusion_image_cpu.yaml sizes: 64 px resize,
     56 px crop) at a full-width ResNet-18 on both sides, because LeRobot's config names a stock
     torchvision ResNet, which cannot be 16 channels wide like our preset's; a second row runs our
     preset's width-16 trunk on both sides, put into LeRobot's encoder by hand (not a LeRobot config);
  3. DDIM-10 latency of one action chunk at batch 1 (median, p90) for both models.

Ours: PushTDataset.get_batch on the resident dataset, the step `dp train` takes (loss noise, forward,
backward, AdamW, LR schedule, EMA). LeRobot: a LeRobotDataset written from the same zarr with
LeRobot's own writer, read through a torch DataLoader with its EpisodeAwareSampler, the policy
preprocessor, and lerobot_train.update_policy (forward, backward, grad-norm clip, Adam, LR schedule;
LeRobot has no EMA). Both sides run one torch thread (--threads). Each side is set up and warmed up
once (LeRobot's in a worker process that stays alive), then the sides take turns, one block of
--steps steps (or --calls chunks) each, for --repeats rounds, so both meet the same drift in a
shared machine's load; each side's best block counts.

lerobot 0.4.x pins torch < 2.11 and needs torchvision, which cannot share our venv, so it lives in
its own venv (.bench/lerobot/.venv, git-ignored) made on first use: lerobot with --no-deps plus the
dependencies that its training and dataset code import (no wandb, rerun, pynput or torchcodec), on
torch 2.14.1 + torchvision 0.29.1 (a pair that imports together; lerobot's pin is ignored). Its side
runs in scripts/_lerobot_worker.py under that venv's python. Because the two sides use different
torch builds, a fixed pure-torch workload is timed under both, and printed beside the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "scripts" / "_lerobot_worker.py"
DEFAULT_ZARR = Path(
    os.environ.get("DP_PUSHT_ZARR", REPO.parent / "shared/data/pusht/pusht_cchi_v7_replay.zarr")
)
BENCH_DIR = REPO / ".bench" / "lerobot"
LEROBOT = "lerobot==0.4.4"
# torch + torchvision that import together on Python 3.11 (lerobot's own pin, torch < 2.11, would
# pull a CUDA build of an old torch; the policy and dataset code run unchanged on 2.14).
THEIR_TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# What lerobot's dataset, policy, processor and training code import (its METADATA ranges), without
# the robot, logging and video-decoding extras (pynput, wandb, rerun-sdk, torchcodec, cmake).
THEIR_DEPS = [
    "datasets>=4.0.0,<5.0.0",
    "diffusers>=0.27.2,<0.36.0",
    "huggingface-hub>=0.34.2,<0.36.0",
    "accelerate>=1.10.0,<2.0.0",
    "einops>=0.8.0,<0.9.0",
    "draccus==0.10.0",
    "packaging>=24.2,<26.0",
    "termcolor>=2.4.0,<4.0.0",
    "deepdiff>=7.0.1,<9.0.0",
    "jsonlines>=4.0.0,<5.0.0",
    "av>=15.0.0,<16.0.0",
    "gymnasium>=1.1.1,<2.0.0",
    "opencv-python-headless>=4.9.0,<4.13.0",
    "imageio>=2.34.0,<3.0.0",
    "pyserial>=3.5,<4.0",
]
IMPORT_CHECK = (
    "import lerobot.policies.diffusion.modeling_diffusion, lerobot.datasets.lerobot_dataset, "
    "lerobot.scripts.lerobot_train"
)
TASKS = {
    # name: (our preset, overrides, obs_type); the image row runs ResNet-18 at LeRobot's width
    "state": ("pusht_diffusion_state_cpu", [], "keypoints"),
    "image": ("pusht_diffusion_image_cpu", ["policy.encoder.resnet_width=64"], "pixels_agent_pos"),
    "image_w16": ("pusht_diffusion_image_cpu", [], "pixels_agent_pos"),
}


# --- the LeRobot venv ----------------------------------------------------------------------------


def dir_size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def ensure_lerobot_venv(venv: Path) -> Path | None:
    """Make the LeRobot venv if needed; return its python, or None after printing why it failed."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", IMPORT_CHECK]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(
        f"installing {LEROBOT} into {venv} (its own venv: it needs torchvision and torch<2.11) ..."
    )
    pip = [str(python), "-m", "pip", "install", "-q"]
    t0 = time.time()
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        for cmd in (
            pip + THEIR_TORCH,
            pip + ["--no-deps", LEROBOT],
            pip + THEIR_DEPS + THEIR_TORCH,  # torch named again so no dependency moves it
        ):
            print("  " + " ".join(cmd[3:]), flush=True)
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        subprocess.run(check, check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        print(f"SKIP LeRobot: could not install it into {venv}: {str(detail).strip()[-400:]}")
        return None
    info = {"install_s": round(time.time() - t0, 1), "size_gb": round(dir_size_gb(venv), 2)}
    (venv.parent / "install.json").write_text(json.dumps(info))
    print(f"  done in {info['install_s']:.0f} s, venv {info['size_gb']:.1f} GB")
    return python


def worker_env(threads: int) -> dict[str, str]:
    """One OpenMP thread like torch's, everything offline, and a private HF cache."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(threads, 1)), "WANDB_MODE": "disabled"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("HF_HOME", str(BENCH_DIR / "hf_home"))  # never touch the user's HF cache
    return env


def run_worker(python: Path, spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run a one-shot worker command (build, control) under `python`; return its JSON line."""
    res = subprocess.run(
        [str(python), str(WORKER)],
        input=json.dumps(spec) + "\n",  # on stdin: specs can be long
        capture_output=True,
        text=True,
        env=worker_env(spec.get("threads", 1)),
        timeout=timeout,
    )
    if res.returncode != 0:
        raise RuntimeError(f"worker {spec['cmd']} failed: {res.stderr.strip()[-1500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- the datasets --------------------------------------------------------------------------------


_DATASETS: dict[tuple, Any] = {}


def load_ours(zarr: Path, task: str):
    """Our config and training dataset for a task (train episodes as the preset chooses them); the
    dataset is kept for the next task with the same windows (the image rows share 0.7 GB of frames)."""
    from diffusion_policy.config import load_config
    from diffusion_policy.data.datasets import make_pusht_datasets

    preset, overrides, obs_type = TASKS[task]
    cfg = load_config(preset, ["train.device=cpu", f"task.obs_type={obs_type}", *overrides])
    p, d = cfg.policy, cfg.data
    key = (obs_type, p.horizon, p.n_obs_steps, p.n_action_steps, d.val_ratio, d.split_seed,
           d.max_train_episodes, d.val_episodes)  # fmt: skip
    if key not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[key], _ = make_pusht_datasets(str(zarr), *key)
    return cfg, _DATASETS[key]


def their_dataset(zarr: Path, obs_type: str, episodes: np.ndarray, python: Path):
    """Root of a LeRobotDataset holding exactly `episodes`, written once by LeRobot's writer.

    Frames are stored as images (PNG inside the parquet files), not video: lerobot 0.4.4 decodes video
    with torchcodec (which must match torch and find FFmpeg libraries) or torchvision.io.VideoReader
    (gone from the torchvision that imports beside torch 2.14), and neither works in this venv."""
    from diffusion_policy.data.pusht_format import pusht_frames
    from diffusion_policy.data.replay_buffer import ReplayBuffer

    kind = "keypoints" if obs_type == "keypoints" else "image"
    tag = hashlib.sha1(np.asarray(episodes, dtype=np.int64).tobytes()).hexdigest()[:8]
    repo_id = f"local/pusht_{kind}_{len(episodes)}ep_{tag}"
    root = BENCH_DIR / "datasets" / repo_id.split("/")[1]
    if (root / "meta" / "info.json").exists():
        return repo_id, root
    shutil.rmtree(root, ignore_errors=True)
    keys = ["action", "state", "keypoint" if kind == "keypoints" else "img"]
    buffer = ReplayBuffer.open(str(zarr), "r", keys=keys)
    frames = pusht_frames(buffer, obs_type)
    ends = buffer.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    rows = np.concatenate([np.arange(starts[e], ends[e]) for e in episodes])
    arrays = {"action": frames["action"][rows], "episode_lengths": (ends - starts)[episodes]}
    if kind == "keypoints":  # ours: 9 block keypoints (18) then agent xy (2)
        arrays["environment_state"] = frames["keypoints"][rows, :18]
        arrays["state"] = frames["keypoints"][rows, 18:]
    else:
        arrays["image"] = frames["pixels"][rows]
        arrays["state"] = frames["agent_pos"][rows]
    npz = BENCH_DIR / f"export_{root.name}.npz"
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **arrays)
    print(f"writing {repo_id} ({len(episodes)} episodes, {len(rows)} frames) ...")
    try:
        spec = {"cmd": "build", "npz": str(npz), "root": str(root), "repo_id": repo_id}
        out = run_worker(python, {**spec, "storage": "image", "threads": 1})
    finally:
        npz.unlink(missing_ok=True)
    print(f"  done in {out['build_s']:.0f} s")
    return repo_id, root


# --- the model, as both sides see it -------------------------------------------------------------


def model_spec(cfg) -> dict[str, Any]:
    """Our config's sizes, in the terms the worker turns into a LeRobot DiffusionConfig."""
    p = cfg.policy
    u, n, e = p.unet, p.noise, p.encoder
    spec: dict[str, Any] = {
        "n_obs_steps": p.n_obs_steps,
        "horizon": p.horizon,
        "n_action_steps": p.n_action_steps,
        "down_dims": list(u.down_dims),
        "diffusion_step_embed_dim": u.diffusion_step_embed_dim,
        "kernel_size": u.kernel_size,
        "n_groups": u.n_groups,
        "cond_predict_scale": u.cond_predict_scale,
        "num_train_timesteps": n.num_train_timesteps,
        "beta_schedule": n.beta_schedule,
        "prediction_type": n.prediction_type,
        "clip_sample": n.clip_sample,
        "num_keypoints": e.num_keypoints,
        "inference_steps": 10,
    }
    if e.resnet_width != 64:  # the worker swaps LeRobot's trunk for ours at this width
        spec["resnet_width"] = e.resnet_width
    if cfg.task.obs_type == "pixels_agent_pos":
        if e.image_feature_dim != 2 * e.num_keypoints:
            raise SystemExit("LeRobot's encoder output is 2 x keypoints wide; ours differs here")
        if e.resize_shape:
            ratio = e.crop_shape[0] / e.resize_shape[0]
            if [int(s * ratio) for s in e.resize_shape] != list(e.crop_shape):
                raise SystemExit(
                    "LeRobot derives the crop from resize_shape x crop_ratio; no match"
                )
            spec.update(resize_shape=list(e.resize_shape), crop_ratio=ratio)
        else:
            spec["crop_shape"] = list(e.crop_shape)
    return spec


def sample_obs(ds) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """The first two frames of the first training window: ours (1, To, ...), theirs the newest step."""
    item = ds[0]["obs"]
    ours = {k: v[None] for k, v in item.items()}
    if "keypoints" in item:
        kp = item["keypoints"][-1:]
        theirs = {"environment_state": kp[:, :18].tolist(), "agent_pos": kp[:, 18:].tolist()}
    else:
        theirs = {
            "pixels": item["pixels"][-1:].tolist(),
            "agent_pos": item["agent_pos"][-1:].tolist(),
        }
    return ours, theirs


# --- sessions: one side's measurement, timed a block at a time -----------------------------------


class OursTrain:
    """The step `dp train` takes, on a batch that get_batch gathers from the resident dataset."""

    def __init__(self, cfg, ds, steps: int, warmup: int):
        from diffusers.optimization import get_scheduler

        from diffusion_policy.models.ema import EMAModel
        from diffusion_policy.registry import policy_class
        from diffusion_policy.training.loop import Dist, batch_indices, step_generator

        self.cfg, self.ds, self.steps, self.i = cfg, ds, steps, 0
        self.batch_indices, self.step_generator, self.dist = batch_indices, step_generator, Dist()
        t = cfg.train
        torch.manual_seed(0)
        self.policy = policy_class(cfg.policy.name)(cfg.policy, ds.shape_meta)
        self.policy.fit_normalizer(ds.normalizer_data())
        self.policy.train()
        self.ema = (
            EMAModel(self.policy, power=t.ema.power, max_decay=t.ema.max_decay)
            if t.ema.enabled
            else None
        )
        self.opt = torch.optim.AdamW(
            self.policy.parameters(), lr=t.optim.lr, betas=tuple(t.optim.betas), eps=t.optim.eps,
            weight_decay=t.optim.weight_decay,
        )  # fmt: skip
        self.sched = get_scheduler(
            t.optim.lr_scheduler, self.opt, num_warmup_steps=t.optim.lr_warmup_steps,
            num_training_steps=100_000,
        )  # fmt: skip
        for _ in range(warmup):
            self.step()

    def step(self) -> tuple[float, float]:
        """(data s, update s): get_batch, then loss noise, forward, backward, AdamW, LR, EMA."""
        t, bs, i = self.cfg.train, self.cfg.train.batch_size, self.i
        t0 = time.perf_counter()
        idx = self.batch_indices(len(self.ds), bs, i, t.seed, self.dist, "cpu")
        batch = self.ds.get_batch(idx)
        t1 = time.perf_counter()
        batch.update(self.policy.sample_training_noise(bs, self.step_generator(t.seed, i, "cpu")))
        loss = self.policy(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.optim.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), t.optim.grad_clip_norm)
        self.opt.step()
        self.sched.step()
        if self.ema:
            self.ema.step(self.policy)
        self.i += 1
        return t1 - t0, time.perf_counter() - t1

    def info(self) -> dict[str, Any]:
        return {
            "params_m": sum(q.numel() for q in self.policy.parameters()) / 1e6,
            "train_samples": len(self.ds),
            "episodes": int(self.ds.episode_mask.sum()),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }

    def block(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        parts = [self.step() for _ in range(self.steps)]
        return {"wall_s": time.perf_counter() - t0, "parts": parts}


class OursSample:
    """DDIM-10 chunk latency at batch 1 through evaluation's Actor (numpy in, numpy out)."""

    def __init__(
        self, cfg, ds, obs: dict[str, np.ndarray], calls: int, warmup: int, backend: str = "auto"
    ):
        from diffusion_policy.evaluation.rollout import Actor
        from diffusion_policy.registry import policy_class

        torch.manual_seed(0)
        self.policy = policy_class(cfg.policy.name)(cfg.policy, ds.shape_meta)
        self.policy.fit_normalizer(ds.normalizer_data())
        self.policy.eval()
        self.policy.set_sampler("ddim", 10)
        self.policy.set_inference_backend(backend)  # `dp eval` and `dp serve` default to auto
        self.actor, self.obs, self.calls = Actor(self.policy, seed=0), obs, calls
        for _ in range(warmup):
            self.actor(obs)

    def info(self) -> dict[str, Any]:
        params = sum(q.numel() for q in self.policy.parameters()) / 1e6
        return {"params_m": params, "threads": torch.get_num_threads(), "torch": torch.__version__}

    def block(self) -> dict[str, Any]:
        times = []
        for _ in range(self.calls):
            t0 = time.perf_counter()
            self.actor(self.obs)
            times.append(time.perf_counter() - t0)
        return {"times_s": times}


class TheirSession:
    """A worker session in the LeRobot venv, driven over its stdin/stdout one block at a time."""

    def __init__(self, python: Path, spec: dict[str, Any]):
        self.log = (BENCH_DIR / "worker.log").open("a")  # stderr: warnings, and why it failed
        self.proc = subprocess.Popen(
            [str(python), str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=worker_env(spec["threads"]),
        )
        self.ready = self.send(spec)["ready"]

    def send(self, msg: dict[str, Any] | str) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write((msg if isinstance(msg, str) else json.dumps(msg)) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("{"):  # anything else is a library printing to stdout
                return json.loads(line)
        raise RuntimeError(f"LeRobot worker died: see {BENCH_DIR / 'worker.log'}")

    def info(self) -> dict[str, Any]:
        return self.ready

    def block(self) -> dict[str, Any]:
        return self.send("block")

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()


def interleave(sessions: dict[str, Any], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """`repeats` rounds of one block per session, the order rotating each round, so every side
    meets the same drift in the machine's load."""
    names = list(sessions)
    blocks: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            blocks[n].append(sessions[n].block())
    return blocks


def summarize_train(info: dict[str, Any], blocks: list[dict[str, Any]], bs: int) -> dict[str, Any]:
    """Best block's samples/s (the least disturbed one), with its median data and update times."""
    best = min(blocks, key=lambda b: b["wall_s"])
    n = len(best["parts"])
    return {
        **info,
        "samples_per_s": bs * n / best["wall_s"],
        "all_samples_per_s": [bs * len(b["parts"]) / b["wall_s"] for b in blocks],
        "data_ms": 1e3 * statistics.median(p[0] for p in best["parts"]),
        "update_ms": 1e3 * statistics.median(p[1] for p in best["parts"]),
    }


def summarize_sample(info: dict[str, Any], blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The block with the lowest median latency: its median and p90."""
    best = min(blocks, key=lambda b: statistics.median(b["times_s"]))
    return {
        **info,
        "median_ms": 1e3 * statistics.median(best["times_s"]),
        "p90_ms": 1e3 * float(np.percentile(best["times_s"], 90)),
        "medians_ms": [1e3 * statistics.median(b["times_s"]) for b in blocks],
    }


# --- the report ----------------------------------------------------------------------------------


ROWS = [  # (result key, label, kind)
    ("train/state", "train samples/s, state (keypoints), B=64", "rate"),
    ("train/image", "train samples/s, image (ResNet-18 w64, 96->64 px, 56 crop), B=64", "rate"),
    (
        "train/image_w16",
        "train samples/s, image, our preset's w16 ResNet-18 (LeRobot: trunk swapped in)",
        "rate",
    ),
    ("sample/state", "DDIM-10 chunk latency B=1, state: median ms", "median_ms"),
    ("sample/state", "DDIM-10 chunk latency B=1, state: p90 ms", "p90_ms"),
    ("sample/image", "DDIM-10 chunk latency B=1, image (w64): median ms", "median_ms"),
    ("sample/image", "DDIM-10 chunk latency B=1, image (w64): p90 ms", "p90_ms"),
]


def print_table(results: dict[str, Any]) -> None:
    """Markdown table: throughput ratios are ours / LeRobot, latency ratios LeRobot ms / ours ms, so
    above 1 means ours is faster either way."""
    ours, theirs = results["ours"], results["theirs"]
    print("\n| measurement | ours | LeRobot | speed, ours / LeRobot | ours data / step ms | LeRobot data / step ms |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for key, label, kind in ROWS:
        o = ours.get(key)
        if o is None:
            continue
        if kind != "rate":
            tv = theirs.get(key, {}).get(kind)
            ratio = f"{tv / o[kind]:.2f}x" if tv else "-"
            print(f"| {label} | {o[kind]:.1f} | {f'{tv:.1f}' if tv else '-'} | {ratio} | | |")
            continue
        for their_key in [key, *sorted(k for k in theirs if k.startswith(key + "@"))]:
            t = theirs.get(their_key)
            row = (
                label if their_key == key else f"{label}; LeRobot {t['workers']} DataLoader workers"
            )
            tv = t["samples_per_s"] if t else None
            ratio = f"{o['samples_per_s'] / tv:.2f}x" if tv else "-"
            mine = f"{o['data_ms']:.1f} / {o['data_ms'] + o['update_ms']:.0f}"
            other = f"{t['data_ms']:.1f} / {t['data_ms'] + t['update_ms']:.0f}" if t else "-"
            print(f"| {row} | {o['samples_per_s']:.1f} | {f'{tv:.1f}' if tv else '-'} | {ratio} | {mine} | {other} |")  # fmt: skip
    for key in ("train/state", "train/image", "train/image_w16"):
        if key in ours:
            o, t = ours[key], theirs.get(key, {})
            print(f"\n{key}: params ours {o['params_m']:.2f} M / LeRobot {t.get('params_m', float('nan')):.2f} M; "
                  f"windows per epoch {o['train_samples']} / {t.get('train_samples', '-')}; "
                  f"episodes {o['episodes']} / {t.get('episodes', '-')}; samples/s of every block: "
                  f"ours {[round(x, 1) for x in o['all_samples_per_s']]}, "
                  f"LeRobot {[round(x, 1) for x in t.get('all_samples_per_s', [])]}")  # fmt: skip
    c = results["control"]
    if "ours" in c and "theirs" in c:
        print(f"torch control (same conv2d+conv1d fwd/bwd, best ms): ours {c['ours']['torch']} {c['ours']['ms']:.1f}, "
              f"LeRobot venv {c['theirs']['torch']} {c['theirs']['ms']:.1f} (ratio {c['theirs']['ms'] / c['ours']['ms']:.2f})")  # fmt: skip


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--path", type=Path, default=DEFAULT_ZARR, help="Push-T zarr store")
    p.add_argument("--steps", type=int, default=20, help="training steps per timed block")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps/calls first")
    p.add_argument("--repeats", type=int, default=3, help="blocks per side; the best counts")
    p.add_argument("--calls", type=int, default=30, help="chunks per latency block")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument(
        "--their-workers", type=int, nargs="+", default=[0],
        help="LeRobot DataLoader workers; the first is the headline, others add rows",
    )  # fmt: skip
    p.add_argument(
        "--tasks", nargs="+", choices=["state", "image", "image_w16", "sample"],
        default=["state", "image", "image_w16", "sample"], help="what to measure",
    )  # fmt: skip
    p.add_argument("--venv", type=Path, default=BENCH_DIR / ".venv", help="LeRobot venv")
    p.add_argument("--no-theirs", action="store_true", help="skip LeRobot")
    p.add_argument(
        "--backend", default="auto", help="our DDIM backend for the latency rows (auto, eager, ...)"
    )
    p.add_argument("--json", type=Path, help="write all results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.path.exists():
        print(f"SKIP: no Push-T store at {args.path} (--path)")
        return 0
    BENCH_DIR.mkdir(parents=True, exist_ok=True)

    python = None if args.no_theirs else ensure_lerobot_venv(args.venv)
    results: dict[str, Any] = {
        "ours": {},
        "theirs": {},
        "control": {},
        "models": {},
        "load_avg": [],
    }
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    results["host"] = {"cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor()}  # fmt: skip
    install = args.venv.parent / "install.json"
    if python and install.exists():
        results["lerobot_install"] = json.loads(install.read_text())
    results["load_avg"].append(os.getloadavg()[0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
          f"load average {results['load_avg'][-1]:.2f}")  # fmt: skip

    if python:
        spec = {"cmd": "control", "threads": args.threads, "calls": 20}
        for _ in range(2):  # alternate, keep each side's best: the load drifts
            for side, py in (("ours", Path(sys.executable)), ("theirs", python)):
                r = run_worker(py, spec)
                if r["ms"] < results["control"].get(side, {"ms": float("inf")})["ms"]:
                    results["control"][side] = r

    train_tasks = [t for t in ("state", "image", "image_w16") if t in args.tasks]
    sample_tasks = [t for t in ("state", "image") if "sample" in args.tasks]
    for task in dict.fromkeys(train_tasks + sample_tasks):
        cfg, ds = load_ours(args.path, task)
        common = {"threads": args.threads, "warmup": args.warmup, "model": model_spec(cfg)}
        common["repo_dir"] = str(REPO)
        results["models"][task] = {"preset": cfg.preset, "overrides": TASKS[task][1], **common["model"]}  # fmt: skip
        theirs_here = python is not None
        if theirs_here:
            eps = np.flatnonzero(ds.episode_mask)
            repo_id, root = their_dataset(args.path, cfg.task.obs_type, eps, python)
            common.update(repo_id=repo_id, root=str(root))
        if task in train_tasks:
            bs = cfg.train.batch_size
            print(f"train/{task}: setting up ...", flush=True)
            sessions: dict[str, Any] = {"ours": OursTrain(cfg, ds, args.steps, args.warmup)}
            for w in args.their_workers if theirs_here else []:
                spec = {**common, "cmd": "train", "steps": args.steps, "batch_size": bs, "workers": w}  # fmt: skip
                sessions[f"theirs@{w}"] = TheirSession(python, spec)
            print(f"train/{task}: {args.repeats} rounds of {args.steps} steps, sides alternating ...", flush=True)  # fmt: skip
            blocks = interleave(sessions, args.repeats)
            for name, s in sessions.items():
                summary = summarize_train(s.info(), blocks[name], bs)
                if name == "ours":
                    results["ours"][f"train/{task}"] = summary
                else:
                    first = name == f"theirs@{args.their_workers[0]}"
                    results["theirs"][f"train/{task}" + ("" if first else f"@{name[7:]}")] = summary
                    s.close()
            results["load_avg"].append(os.getloadavg()[0])
        if task in sample_tasks:
            obs, their_obs = sample_obs(ds)
            print(f"sample/{task}: {args.repeats} rounds of {args.calls} chunks ...", flush=True)
            sessions = {"ours": OursSample(cfg, ds, obs, args.calls, args.warmup, args.backend)}
            if theirs_here:
                spec = {**common, "cmd": "sample", "calls": args.calls, "obs": their_obs}
                sessions["theirs"] = TheirSession(python, spec)
            blocks = interleave(sessions, args.repeats)
            for name, s in sessions.items():
                results[name][f"sample/{task}"] = summarize_sample(s.info(), blocks[name])
                if name == "theirs":
                    s.close()
            results["load_avg"].append(os.getloadavg()[0])

    print_table(results)
    print(f"load average (1 min) through the run: {[round(x, 2) for x in results['load_avg']]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
