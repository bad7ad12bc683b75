"""Fast DDIM sampling: one module for batch-1 serving, CUDA graphs and export.

The reference loop (`DiffusionPolicy.conditional_sample`) calls the UNet and diffusers'
`DDIMScheduler.step` K times. Three things in it are constant for a given chunk or step count, and
this module takes them out of the loop:

* the scheduler's coefficients: read once from the diffusers scheduler into tables (the DDIM update
  with eta = 0 is x' = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, with x0 optionally clipped);
* the timestep embeddings of the K steps;
* what depends on (step, observation) only, computed once per chunk for all K steps instead of K
  times (the denoiser's `step_table`): the UNet's FiLM vectors of every block
  (`ConditionalUnet1D.film_table`), the transformer's conditioning tokens after their encoder
  (`TransformerForDiffusion.memory`).

What is left per step is the convolution stack (the decoder layers). `DDIMSampler` is a plain `nn.Module` with fixed
shapes and no Python branching on data, so it can be traced (`torch.jit`), captured whole in a CUDA
graph, or exported to ONNX. `FastSampler` picks and caches such a backend per batch size.
Results equal the reference loop to float rounding (tests/test_sampling.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from diffusion_policy.models.packed_unet import PackedUnet
from diffusion_policy.models.unet1d import ConditionalUnet1D
from diffusion_policy.policies.sampler_names import BACKENDS


@dataclass(frozen=True)
class DDIMTable:
    """Per-step constants of a K-step deterministic DDIM run (eta = 0), in sampling order."""

    timesteps: torch.Tensor  # (K,) int64
    sqrt_a: torch.Tensor  # (K,) sqrt(abar_t)
    sqrt_1ma: torch.Tensor  # (K,) sqrt(1 - abar_t)
    sqrt_a_prev: torch.Tensor  # (K,) sqrt(abar_prev)
    sqrt_1ma_prev: torch.Tensor  # (K,) sqrt(1 - abar_prev)
    clip: float | None  # clamp x0 to [-clip, clip], or None
    prediction_type: str  # epsilon | sample


def ddim_table(scheduler, num_steps: int) -> DDIMTable:
    """Read the coefficients of `num_steps` DDIM steps off a diffusers DDIMScheduler, its rules included

    (timestep spacing, the previous timestep as t - T // K, and final_alpha_cumprod at the end).
    """
    cfg = scheduler.config
    scheduler.set_timesteps(num_steps)
    ts = scheduler.timesteps.to(torch.int64)
    ac = scheduler.alphas_cumprod.to(torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    ratio = cfg.num_train_timesteps // num_steps
    a = ac[ts]
    a_prev = torch.stack([ac[t - ratio] if t - ratio >= 0 else final for t in ts.tolist()])
    if cfg.prediction_type not in ("epsilon", "sample"):
        raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported here")
    return DDIMTable(
        timesteps=ts,
        sqrt_a=a**0.5,
        sqrt_1ma=(1 - a) ** 0.5,
        sqrt_a_prev=a_prev**0.5,
        sqrt_1ma_prev=(1 - a_prev) ** 0.5,
        clip=float(cfg.clip_sample_range) if cfg.clip_sample and not cfg.thresholding else None,
        prediction_type=cfg.prediction_type,
    )


def ddim_step(
    x: torch.Tensor,
    out: torch.Tensor,
    sqrt_a: torch.Tensor | float,
    sqrt_1ma: torch.Tensor | float,
    sqrt_a_prev: torch.Tensor | float,
    sqrt_1ma_prev: torch.Tensor | float,
    clip: float | None,
    prediction_type: str,
) -> torch.Tensor:
    """One deterministic DDIM update (DDIMScheduler.step with eta = 0), differentiable."""
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - sqrt_1ma * eps) / sqrt_a
    else:
        x0 = out
        eps = (x - sqrt_a * x0) / sqrt_1ma
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return sqrt_a_prev * x0 + sqrt_1ma_prev * eps


class DDIMSampler(nn.Module):
    """obs (raw, (B, To, ...) per key in shape_meta order) + noise (B, T, Da) -> action chunk (B, T, Da).

    Shares the policy's weights (nothing is copied), so it stays correct while they train.
    """

    def __init__(
        self,
        policy,
        num_steps: int,
        packed: PackedUnet | None = None,
        table: DDIMTable | None = None,
    ):
        super().__init__()
        self.policy = policy
        self.packed = packed
        self.keys = list(policy.shape_meta.obs)
        self.table = table if table is not None else ddim_table(policy.sampler, num_steps)
        self.num_steps = num_steps
        dev = policy.device
        self.register_buffer("timesteps", self.table.timesteps.to(dev), persistent=False)
        # python floats: they become constants of a traced or captured graph
        self.coef = [
            (
                float(self.table.sqrt_a[k]),
                float(self.table.sqrt_1ma[k]),
                float(self.table.sqrt_a_prev[k]),
                float(self.table.sqrt_1ma_prev[k]),
            )
            for k in range(num_steps)
        ]

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.policy.normalizer.unnormalize("action", self.denoise(*args))

    def denoise(self, *args: torch.Tensor) -> torch.Tensor:
        """The K-step chunk in normalised units; differentiable (dp distill trains through it)."""
        *obs_list, noise = args
        p = self.policy
        obs = dict(zip(self.keys, obs_list, strict=True))
        cond = p.condition(p.normalize_obs(obs))
        table = p.model.step_table(self.timesteps, cond)  # list of (K, B, ...)
        x = noise.to(cond.dtype)
        net = self.packed if self.packed is not None else p.model
        for k in range(self.num_steps):
            out = net.forward_step(x, [c[k] for c in table])
            x = ddim_step(x, out, *self.coef[k], self.table.clip, self.table.prediction_type)
        return x


def packed_denoiser(policy) -> PackedUnet | None:
    """The CPU layout of the policy's denoiser, or None where it has none (the transformer's
    layers are GEMMs on (B, T, C) already)."""
    return PackedUnet(policy.model) if isinstance(policy.model, ConditionalUnet1D) else None


# The traced CPU kernel (PackedUnet) wins at small batches and holds buffers that grow with the
# batch: measured on the CPU preset's UNet, DDIM-10, one thread (2-core x86_64 VM): batch 1 22 ms
# against eager 84 ms; batch 50 348 against 390 ms (+0.4 GB); batch 800 (BID's 16 candidates for 50
# envs) 6.9 s against 5.2 s and +5.7 GB. Larger batches run the reference loop.
CPU_TRACE_MAX_BATCH = 64


class FastSampler:
    """A DDIMSampler behind a backend, cached per input shape (shapes are fixed inside a backend).

    * `fused`: the module, eagerly (any device).
    * `cpu`: the module traced with torch.jit once per batch size; a UNet runs as the time-major
      GEMM kernel (PackedUnet), the fastest here at batch 1. It packs (and traces) a snapshot of
      the weights and redoes it when any weight has changed in place since (an optimizer or EMA
      step, load_state_dict).
    * `cuda_graph`: the whole K-step loop captured once per batch size and replayed: one launch
      instead of hundreds, which is what a batch-1 chunk is bound by on a GPU.
    * `auto`: cuda_graph on CUDA, cpu on the CPU.
    """

    def __init__(self, policy, num_steps: int, backend: str = "auto"):
        if backend not in BACKENDS or backend == "eager":
            raise ValueError(f"backend {backend!r}: expected one of {BACKENDS[1:]} (not eager)")
        self.policy = policy
        self.num_steps = num_steps
        self.device = policy.device
        if backend == "auto":
            backend = "cuda_graph" if self.device.type == "cuda" else "cpu"
        if backend == "cuda_graph" and self.device.type != "cuda":
            raise ValueError("backend cuda_graph needs the policy on a CUDA device")
        if backend == "cpu" and self.device.type != "cpu":
            raise ValueError(f"backend cpu needs the policy on the CPU, not {self.device}")
        self.backend = backend
        self.module = DDIMSampler(policy, num_steps)
        self._runners: dict[tuple, Callable[[list[torch.Tensor]], torch.Tensor]] = {}
        self._version = -1
        self._tensors: list[torch.Tensor] | None = None

    def _weights_version(self) -> int:
        # the tensors are listed once: walking the module tree costs ~2 ms a call, their counters ~20 us
        if self._tensors is None:
            self._tensors = [*self.policy.parameters(), *self.policy.buffers()]
        return sum(t._version for t in self._tensors)

    @torch.no_grad()
    def __call__(self, obs: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        if self.backend == "cpu":
            version = self._weights_version()
            if version != self._version:  # repack a fresh snapshot
                self.module = DDIMSampler(self.policy, self.num_steps, packed_denoiser(self.policy))
                self._runners.clear()
                self._version = version
        inputs = [obs[k] for k in self.module.keys] + [noise]
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        run = self._runners.get(key)
        if run is None:
            run = self._runners[key] = self._build(inputs)
        return run(inputs)

    def _build(self, inputs: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        m = self.module
        if self.backend == "fused":
            return lambda xs: m(*xs)
        if self.backend == "cpu":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # trace warnings about constant python floats
                traced = torch.jit.trace(m, tuple(inputs), check_trace=False)
            return lambda xs: traced(*xs)
        return _capture(m, inputs)


def _capture(
    module: nn.Module, example: list[torch.Tensor]
) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Capture module(*static) in a CUDA graph; the runner copies inputs in and returns a copy out."""
    static = [x.detach().clone() for x in example]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: cuDNN picks algorithms, the allocator sees the sizes
            module(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = module(*static)

    def run(xs: list[torch.Tensor]) -> torch.Tensor:
        for s, x in zip(static, xs, strict=True):
            s.copy_(x, non_blocking=True)
        graph.replay()
        return out.clone()

    return run
