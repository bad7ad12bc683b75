"""LeRobot's side of scripts/bench_lerobot.py; runs inside the LeRobot venv, JSON lines in and out.

    echo '{"cmd": "control", "threads": 1, "calls": 20}' | python scripts/_lerobot_worker.py

It lives in its own file because lerobot 0.4.x cannot share our venv (it pins torch < 2.11 and needs
torchvision), so bench_lerobot.py runs it with the LeRobot venv's python. The first line on stdin is
a spec; one-shot commands answer with one JSON line and exit:

* build:   write a LeRobotDataset from arrays exported by bench_lerobot.py (an .npz), with LeRobot's own
           writer (LeRobotDataset.create / add_frame / save_episode / finalize).
* control: a fixed pure-torch workload, run by both venvs to show what the torch builds alone differ by.

Session commands ("train", "sample") set up and warm up, answer {"ready": ...}, then time one block
per "block" line until "exit" or end of input. Sessions let bench_lerobot.py alternate blocks of ours
and LeRobot's, so both sides see the same drifting load of a shared machine:

* train:   LeRobot's training step as lerobot_train.py runs it: LeRobotDataset + torch DataLoader
           (EpisodeAwareSampler), the policy preprocessor (normalisation), and lerobot's own
           `update_policy` (forward, backward, grad clip, Adam, LR scheduler) under an Accelerator.
* sample:  one action chunk at batch 1 through the eval path (preprocess_observation ->
           preprocessor -> select_action after reset, which denoises a whole chunk -> postprocessor).

No lerobot import happens at module level, so `control` also runs under our venv's python.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

TASK = "Push the T-shaped block onto the T-shaped target."


def set_threads(n: int) -> None:
    """One intra-op thread by default: OpenMP spin-waits are ruinous on a shared 2-vCPU machine."""
    if n > 0:
        torch.set_num_threads(n)


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import lerobot

        out["lerobot"] = lerobot.__version__
    except ImportError:
        pass
    return out


# --- one-shot commands ---------------------------------------------------------------------------


def build(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the Push-T episodes in spec["npz"] as a LeRobotDataset at spec["root"]."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    with np.load(spec["npz"]) as npz:  # NpzFile re-reads an array on every index: load each once
        data = {k: npz[k] for k in npz.files}
    features: dict[str, dict[str, Any]] = {
        "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
    }
    if "environment_state" in data:
        features["observation.environment_state"] = {
            "dtype": "float32",
            "shape": (data["environment_state"].shape[1],),
            "names": None,
        }
    if "image" in data:
        features["observation.image"] = {
            "dtype": spec["storage"],  # "image" (PNG in parquet) or "video"
            "shape": tuple(data["image"].shape[1:]),
            "names": ["height", "width", "channels"],
        }
    t0 = time.perf_counter()
    ds = LeRobotDataset.create(
        repo_id=spec["repo_id"],
        fps=10,
        features=features,
        root=spec["root"],
        robot_type="2d pointer",
        use_videos=spec["storage"] == "video",
        image_writer_threads=2 if "image" in data else 0,
    )
    start = 0
    for n in data["episode_lengths"]:
        for i in range(start, start + int(n)):
            frame: dict[str, Any] = {"task": TASK}
            for key in ("state", "environment_state", "image"):
                if key in data:
                    frame[f"observation.{key}"] = data[key][i]
            frame["action"] = data["action"][i]
            ds.add_frame(frame)
        ds.save_episode()
        start += int(n)
    ds.finalize()
    if ds.image_writer is not None:
        ds.stop_image_writer()
    return {"episodes": len(data["episode_lengths"]), "frames": start, "build_s": time.perf_counter() - t0}  # fmt: skip


def control(spec: dict[str, Any]) -> dict[str, Any]:
    """ms of a fixed conv2d + conv1d forward/backward: the same work in both venvs shows how far the
    two torch builds alone differ on this CPU."""
    set_threads(spec["threads"])
    torch.manual_seed(0)
    net2d = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 7, stride=2, padding=3),
        torch.nn.GroupNorm(4, 64),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.GroupNorm(4, 64),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1),
    )
    net1d = torch.nn.Sequential(
        torch.nn.Conv1d(64, 256, 5, padding=2),
        torch.nn.GroupNorm(8, 256),
        torch.nn.Mish(),
        torch.nn.Conv1d(256, 256, 5, padding=2),
    )
    x2, x1 = torch.randn(32, 3, 56, 56), torch.randn(64, 64, 16)

    def work() -> None:
        (net2d(x2).sum() + net1d(x1).sum()).backward()

    for _ in range(3):
        work()
    times = []
    for _ in range(spec["calls"]):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * min(times), "median_ms": 1e3 * float(np.median(times)), **versions()}


# --- the policy and its data, as lerobot_train.py builds them --------------------------------------


def policy_config(spec: dict[str, Any], sampling: bool = False):
    """A DiffusionConfig with the sizes bench_lerobot.py asks for (the rest: LeRobot's defaults)."""
    from lerobot.configs.types import NormalizationMode
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    m = spec["model"]
    cfg = DiffusionConfig(
        n_obs_steps=m["n_obs_steps"],
        horizon=m["horizon"],
        n_action_steps=m["n_action_steps"],
        down_dims=tuple(m["down_dims"]),
        diffusion_step_embed_dim=m["diffusion_step_embed_dim"],
        kernel_size=m["kernel_size"],
        n_groups=m["n_groups"],
        use_film_scale_modulation=m["cond_predict_scale"],
        num_train_timesteps=m["num_train_timesteps"],
        beta_schedule=m["beta_schedule"],
        prediction_type=m["prediction_type"],
        clip_sample=m["clip_sample"],
        vision_backbone="resnet18",
        pretrained_backbone_weights=None,
        use_group_norm=True,
        spatial_softmax_num_keypoints=m.get("num_keypoints", 32),
        resize_shape=tuple(m["resize_shape"]) if m.get("resize_shape") else None,
        crop_ratio=m.get("crop_ratio", 1.0),
        noise_scheduler_type="DDIM" if sampling else "DDPM",
        num_inference_steps=m["inference_steps"] if sampling else None,
        device="cpu",
    )
    if m.get("resize_shape") is None and m.get("crop_shape"):
        cfg.crop_shape = tuple(m["crop_shape"])
    # Our policy min-max normalises every low-dim input; LeRobot's default mapping has no "ENV"
    # entry, so the keypoints would pass through raw. Normalise them too, as ours does.
    cfg.normalization_mapping = {**cfg.normalization_mapping, "ENV": NormalizationMode.MIN_MAX}
    return cfg


def imagenet_stats(meta) -> None:
    """DatasetConfig.use_imagenet_stats defaults to True: camera stats become ImageNet's."""
    from lerobot.datasets.factory import IMAGENET_STATS

    for key in meta.camera_keys:
        for stat, value in IMAGENET_STATS.items():
            meta.stats[key][stat] = torch.tensor(value, dtype=torch.float32)


def make_policy_and_processors(spec: dict[str, Any], cfg, ds_meta):
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    policy = make_policy(cfg=cfg, ds_meta=ds_meta)
    width = spec["model"].get("resnet_width", 64)
    if cfg.image_features and width != 64:
        swap_backbone(policy, cfg, width, spec["repo_dir"])
    pre, post = make_pre_post_processors(policy_cfg=cfg, dataset_stats=ds_meta.stats)
    return policy, pre, post


def swap_backbone(policy, cfg, width: int, repo_dir: str) -> None:
    """Replace LeRobot's torchvision ResNet-18 trunk by our ResNet18Trunk at `width` (GroupNorm,
    torchvision's layout), and its SpatialSoftmax to fit. LeRobot's config only names torchvision
    models, whose BasicBlock ResNets are fixed at width 64, so a narrower trunk must be put in by hand.
    Our vision module imports only torch, so it loads in this venv from the checkout."""
    from lerobot.policies.diffusion.modeling_diffusion import SpatialSoftmax
    from lerobot.policies.utils import get_output_shape

    sys.path.insert(0, repo_dir)
    from diffusion_policy.models.vision import ResNet18Trunk

    enc = policy.diffusion.rgb_encoder
    enc.backbone = ResNet18Trunk(width)
    feature_map = get_output_shape(enc.backbone, (1, 3, *cfg.crop_shape))[1:]
    enc.pool = SpatialSoftmax(feature_map, num_kp=cfg.spatial_softmax_num_keypoints)


# --- sessions ------------------------------------------------------------------------------------


class TrainSession:
    """LeRobot's data pipeline and update_policy; block() times `steps` steps."""

    def __init__(self, spec: dict[str, Any]):
        from types import SimpleNamespace

        from accelerate import Accelerator
        from lerobot.datasets.factory import resolve_delta_timestamps
        from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
        from lerobot.datasets.sampler import EpisodeAwareSampler
        from lerobot.datasets.utils import cycle
        from lerobot.scripts.lerobot_train import update_policy

        torch.manual_seed(0)
        self.accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
        set_threads(spec["threads"])
        self.spec, self.update_policy = spec, update_policy
        cfg = policy_config(spec)
        meta = LeRobotDatasetMetadata(spec["repo_id"], root=spec["root"])
        delta = resolve_delta_timestamps(cfg, meta)
        dataset = LeRobotDataset(spec["repo_id"], root=spec["root"], delta_timestamps=delta)
        imagenet_stats(dataset.meta)
        policy, self.preprocessor, _ = make_policy_and_processors(spec, cfg, dataset.meta)
        optimizer = cfg.get_optimizer_preset().build(policy.get_optim_params())
        scheduler = cfg.get_scheduler_preset().build(optimizer, 100_000)
        self.grad_clip = cfg.get_optimizer_preset().grad_clip_norm
        workers = spec["workers"]
        self.sampler = EpisodeAwareSampler(
            dataset.meta.episodes["dataset_from_index"],
            dataset.meta.episodes["dataset_to_index"],
            episode_indices_to_use=dataset.episodes,
            drop_n_last_frames=cfg.drop_n_last_frames,
            shuffle=True,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            num_workers=workers,
            batch_size=spec["batch_size"],
            shuffle=False,
            sampler=self.sampler,
            pin_memory=False,
            drop_last=False,
            prefetch_factor=2 if workers > 0 else None,
        )
        self.policy, self.optimizer, loader, self.scheduler = self.accelerator.prepare(
            policy, optimizer, loader, scheduler
        )
        self.batches = cycle(loader)
        self.policy.train()
        self.metrics = SimpleNamespace()
        self.episodes = dataset.num_episodes
        for _ in range(spec["warmup"]):
            self.step()

    def step(self) -> tuple[float, float]:
        """(data s, update s) of one step: next batch + preprocessor, then update_policy."""
        t0 = time.perf_counter()
        batch = self.preprocessor(next(self.batches))
        t1 = time.perf_counter()
        self.update_policy(
            self.metrics, self.policy, batch, self.optimizer, self.grad_clip,
            self.accelerator, self.scheduler,
        )  # fmt: skip
        return t1 - t0, time.perf_counter() - t1

    def info(self) -> dict[str, Any]:
        return {
            "params_m": sum(p.numel() for p in self.policy.parameters()) / 1e6,
            "train_samples": len(self.sampler),
            "episodes": self.episodes,
            "threads": torch.get_num_threads(),
            "workers": self.spec["workers"],
            **versions(),
        }

    def block(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        parts = [self.step() for _ in range(self.spec["steps"])]
        return {"wall_s": time.perf_counter() - t0, "parts": parts}


class SampleSession:
    """DDIM chunk latency at batch 1; block() times `calls` chunks."""

    def __init__(self, spec: dict[str, Any]):
        from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
        from lerobot.envs.utils import preprocess_observation

        set_threads(spec["threads"])
        torch.manual_seed(0)
        self.spec, self.to_lerobot = spec, preprocess_observation
        cfg = policy_config(spec, sampling=True)
        meta = LeRobotDatasetMetadata(spec["repo_id"], root=spec["root"])
        imagenet_stats(meta)
        self.policy, self.preprocessor, self.postprocessor = make_policy_and_processors(
            spec, cfg, meta
        )
        self.policy.eval()
        obs = {k: np.asarray(v) for k, v in spec["obs"].items()}  # gym-pusht style, batch 1
        self.obs = {k: v.astype(np.uint8 if k == "pixels" else np.float32) for k, v in obs.items()}
        for _ in range(spec["warmup"]):
            self.chunk()

    def chunk(self) -> np.ndarray:
        self.policy.reset()  # empty action queue: select_action denoises a whole chunk
        obs = self.preprocessor(self.to_lerobot(self.obs))
        with torch.inference_mode():
            action = self.policy.select_action(obs)
        return self.postprocessor(action).numpy()

    def info(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.policy.parameters()) / 1e6
        return {"params_m": params, "threads": torch.get_num_threads(), **versions()}

    def block(self) -> dict[str, Any]:
        times = []
        for _ in range(self.spec["calls"]):
            t0 = time.perf_counter()
            self.chunk()
            times.append(time.perf_counter() - t0)
        return {"times_s": times}


ONE_SHOT = {"build": build, "control": control}
SESSIONS = {"train": TrainSession, "sample": SampleSession}


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    spec = json.loads(sys.stdin.readline())
    if spec["cmd"] in ONE_SHOT:
        reply(ONE_SHOT[spec["cmd"]](spec))
        return 0
    session = SESSIONS[spec["cmd"]](spec)
    reply({"ready": session.info()})
    for line in sys.stdin:
        if line.strip() != "block":
            break
        reply(session.block())
    return 0


if __name__ == "__main__":
    sys.exit(main())
