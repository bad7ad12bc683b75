"""What a training run is made of, built from its config: processes, device, data, policy, EMA,
optimiser, lr schedule and length. Randomness is a function of (seed, step), so a resumed run
continues bit-for-bit and a run on N processes (torchrun) sees the same samples and noise as one
process with an N-times larger batch.
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from diffusion_policy.config import Config
from diffusion_policy.data.datasets import make_datasets, task_spec
from diffusion_policy.data.ondisk import frames_nbytes, residency
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.errors import ConfigError, DataError
from diffusion_policy.registry import policy_class
from diffusion_policy.shapes import ShapeMeta
from diffusion_policy.training.step import Learner, build_ema, build_optimizer


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, d: Dist) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and d.world > 1:
        name = f"cuda:{d.local_rank}"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={name!r} but CUDA is not available (use train.device=cpu)"
            )
        index = torch.device(name).index
        torch.cuda.set_device(index if index is not None else torch.cuda.current_device())
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, device: str) -> torch.Generator:
    """A generator that depends only on (seed, step): training noise needs no saved RNG state."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % 2**63)


def batch_indices(
    n: int, global_batch: int, step: int, seed: int, d: Dist, device: str
) -> torch.Tensor:
    """This rank's share of the step's global batch; epoch e is a fixed permutation of (seed, e)."""
    per_epoch = max(1, n // global_batch)
    epoch, b = divmod(step, per_epoch)
    perm = _epoch_permutation(n, global_batch, seed, epoch)
    local = global_batch // d.world
    start = b * global_batch + d.rank * local
    return perm[start : start + local].to(device)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, global_batch: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch, drawn once per epoch rather than once per step."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    if n < global_batch:  # tiny datasets: sample with repetition so shapes stay fixed
        perm = perm.repeat(math.ceil(global_batch / n))
    return perm


def to_device(v: Any, device: str) -> Any:
    if isinstance(v, dict):
        return {k: to_device(x, device) for k, x in v.items()}
    return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v


def training_noise(
    policy, global_batch: int, step: int, seed: int, d: Dist, device: str
) -> dict[str, torch.Tensor]:
    """Per-sample randomness for the whole global batch from (seed, step); this rank keeps its slice."""
    draw = getattr(policy, "sample_training_noise", None)
    if draw is None:
        return {}
    noise = draw(global_batch, step_generator(seed, step, device))
    local = global_batch // d.world
    return {k: v[d.rank * local : (d.rank + 1) * local] for k, v in noise.items()}


@dataclass
class Run:
    """Everything the loop steps: the data, the learner (policy, optimiser, schedule, EMA) and the
    run's length. `cfg` is what its checkpoints carry; `meta` goes into each one's meta.json."""

    cfg: Config
    d: Dist
    device: str
    data_device: str
    train_ds: Any
    val_ds: Any | None
    shape_meta: ShapeMeta
    learner: Learner
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    meta: dict[str, Any] = field(default_factory=dict)

    def batch(self, step: int) -> dict[str, Any]:
        """This rank's batch of `step`: windows by index, and the loss noise of (seed, step)."""
        seed = self.cfg.train.seed
        idx = batch_indices(len(self.train_ds), self.global_batch, step, seed, self.d, self.data_device)  # fmt: skip
        batch = to_device(self.train_ds.get_batch(idx), self.device)
        policy = self.learner.policy
        batch.update(training_noise(policy, self.global_batch, step, seed, self.d, self.device))
        return batch

    def describe(self, run_dir: Path) -> str:
        n_params = sum(q.numel() for q in self.learner.policy.parameters())
        t = self.cfg.train
        backbone = getattr(self.cfg.policy, "backbone", None)
        name = self.cfg.policy.name + (f" ({backbone})" if backbone else "")
        return (f"run {run_dir} | {name} {n_params / 1e6:.2f} M params | {len(self.train_ds)} train windows | "
                f"{self.steps_per_epoch} steps/epoch | {self.total_steps} steps | device {self.device} x{self.d.world}"
                f"{' | CUDA graph' if self.learner.cuda_graph else ''}{' | compiled' if t.compile else ''}")  # fmt: skip


def _how_to_get(task: str, path: Path, declared: bool) -> str:
    """The command that makes a missing store: published data is fetched, a scripted task's generated."""
    from diffusion_policy.data.expert import DEMONSTRATORS

    if not declared:  # the Push-T obs_type shorthand reads the published human demonstrations
        return f"run `dp data fetch pusht` (or `dp data generate pusht --out {path}` offline), or set task.dataset=PATH"  # fmt: skip
    if task in DEMONSTRATORS:
        return f"make it with `dp data generate {task} --episodes 1000 --out {path}`, or set task.dataset=PATH"  # fmt: skip
    return "set task.dataset to your replay-buffer store"


def load_datasets(cfg: Config, device: str) -> tuple[Any, Any | None, str]:
    """(train, validation or None, the device they sit on): on `device` when data.resident."""
    p = cfg.policy
    dataset_path = Path(cfg.task.dataset)
    if not dataset_path.exists():
        raise DataError(f"dataset {dataset_path} not found: {_how_to_get(cfg.task.name, dataset_path, bool(cfg.task.obs))}")  # fmt: skip
    spec = task_spec(cfg.task)
    where, why = residency(cfg.data.resident, frames_nbytes(ReplayBuffer.open(dataset_path, "r", keys=[]), spec), device)  # fmt: skip
    if cfg.data.resident == "auto" and where != "device":
        print(f"data: {why}: {'camera frames read from disk per batch' if where == 'disk' else 'frames in host RAM'} (data.resident=auto)")  # fmt: skip
    train_ds, val_ds = make_datasets(
        str(dataset_path), spec, p.horizon, p.n_obs_steps, p.n_action_steps,
        val_ratio=cfg.data.val_ratio, split_seed=cfg.data.split_seed,
        max_train_episodes=cfg.data.max_train_episodes, val_episodes=cfg.data.val_episodes,
        on_disk=where == "disk",
    )  # fmt: skip
    data_device = "cpu" if where == "host" else device
    train_ds = train_ds.to(data_device)
    if where == "disk":  # read the batches of the coming steps while the current one runs
        d = init_distributed(device)
        g, seed, n = cfg.train.batch_size * d.world, cfg.train.seed, len(train_ds)
        train_ds.follow(functools.partial(batch_indices, n, g, seed=seed, d=d, device="cpu"),
                        locate=functools.partial(locate_step, n=n, global_batch=g, seed=seed, d=d,
                                                 max_steps=_max_steps(cfg, n, g)))  # fmt: skip
    val_ds = val_ds.to(data_device) if val_ds is not None and len(val_ds) > 0 else None
    return train_ds, val_ds, data_device


def locate_step(
    idx: np.ndarray, n: int, global_batch: int, seed: int, d: Dist, max_steps: int
) -> int | None:
    """The step < max_steps whose batch (this rank's) is `idx`, or None: a resumed run's first."""
    per_epoch, local = max(1, n // global_batch), global_batch // d.world
    for epoch in range(math.ceil(max_steps / per_epoch) + 1):
        perm = _epoch_permutation(n, global_batch, seed, epoch).numpy()
        for pos in np.flatnonzero(perm == idx[0]):
            b, rest = divmod(int(pos) - d.rank * local, global_batch)
            if rest == 0 and 0 <= b < per_epoch and np.array_equal(perm[pos : pos + local], idx):
                return epoch * per_epoch + b
    return None


def _max_steps(cfg: Config, n: int, global_batch: int) -> int:
    t = cfg.train
    return t.max_steps if t.max_steps is not None else t.num_epochs * max(1, n // global_batch)


def build_run(cfg: Config, d: Dist, device: str) -> Run:
    """`dp train`'s run: the registered policy on the task's demonstrations."""
    t = cfg.train
    train_ds, val_ds, data_device = load_datasets(cfg, device)
    policy = policy_class(cfg.policy.name)(cfg.policy, train_ds.shape_meta)
    policy.fit_normalizer(train_ds.normalizer_data())
    policy.to(device)
    ema = build_ema(t.ema, policy)
    model: torch.nn.Module = policy
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[d.local_rank] if device.startswith("cuda") else None
        )
    global_batch = t.batch_size * d.world
    steps_per_epoch = max(1, len(train_ds) // global_batch)
    total_steps = _max_steps(cfg, len(train_ds), global_batch)
    use_graph = _use_cuda_graph(cfg, policy, device, d)
    if t.compile:
        policy.model.compile()  # in place: parameter names (and checkpoints) stay the same
    optimizer, lr_sched = build_optimizer(
        t.optim,
        policy.optim_groups(t.optim.weight_decay),
        device,
        total_steps,
        capturable=use_graph,
    )
    learner = Learner(
        policy, model, optimizer, lr_sched, ema, t.amp, t.optim.grad_clip_norm, use_graph
    )
    return Run(cfg, d, device, data_device, train_ds, val_ds, train_ds.shape_meta, learner,
               global_batch, steps_per_epoch, total_steps)  # fmt: skip


def _use_cuda_graph(cfg: Config, policy, device: str, d: Dist) -> bool:
    """train.cuda_graph: null = on where it applies; true insists (an error says why it can't)."""
    from diffusion_policy.training.graph import graph_unsupported_reason

    want = cfg.train.cuda_graph
    if want is False:
        return False
    reason = (
        "it needs CUDA" if not device.startswith("cuda")
        else "it is not combined with multi-process (torchrun) training" if d.world > 1
        else graph_unsupported_reason(policy)
    )  # fmt: skip
    if reason and want:
        raise ConfigError(f"train.cuda_graph=true but the step cannot be graphed: {reason}")
    return reason is None
