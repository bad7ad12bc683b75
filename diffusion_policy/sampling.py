"""Fast DDIM sampling: one module for batch-1 serving, CUDA graphs and export.

The reference loop (`DiffusionPolicy.conditional_sample`) calls the UNet and diffusers'
`DDIMScheduler.step` K times. Three things in it are constant for a given chunk or step count, and
this module takes them out of the loop:

* the scheduler's coefficients: read once from the diffusers scheduler into tables (the DDIM update
  with eta = 0 is x' = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, with x0 optionally clipped);
* the timestep embeddings of the K steps;
* the FiLM linear layers of every block, which depend on (step, observation) only: computed once per
  chunk for all K steps (`ConditionalUnet1D.film_table`), instead of K times.

What is left per step is the convolution stack. `DDIMSampler` is a plain `nn.Module` with fixed
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

BACKENDS = ("auto", "eager", "fused", "cpu", "cuda_graph")


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
        cond = p.global_cond(p.normalize_obs(obs))
        unet = p.model
        films = unet.film_table(self.timesteps, cond)  # list of (K, B, F)
        x = noise.to(cond.dtype)
        net = self.packed if self.packed is not None else unet
        for k in range(self.num_steps):
            out = net.forward_film(x, [f[k] for f in films])
            x = ddim_step(x, out, *self.coef[k], self.table.clip, self.table.prediction_type)
        return x


class FastSampler:
    """A DDIMSampler behind a backend, cached per input shape (shapes are fixed inside a backend).

    * `fused`: the module, eagerly (any device).
    * `cpu`: the time-major GEMM kernel (PackedUnet) traced with torch.jit once per batch size: the
      fastest here at batch 1. It packs a snapshot of the weights and repacks when any weight has
      changed in place since (an optimizer or EMA step, load_state_dict).
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
                self.module = DDIMSampler(
                    self.policy, self.num_steps, PackedUnet(self.policy.model)
                )
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


# --- the CPU kernel: time-major GEMMs --------------------------------------------------------------
#
# At batch 1 an action chunk is 16 steps long, so every convolution is a GEMM with 4 to 16 rows.
# CPU convolution kernels are slow at that shape (a 256->256, k=5 conv on 4 steps: ~110 us with
# F.conv1d, ~20 us as rows @ W^T on the same core), because they are built for wide images. So the
# CPU path keeps activations time-major (B, L, C), turns each conv into unfold + one addmm against a
# weight packed once as (C_in * k, C_out), and the stride-2 transposed conv into one GEMM plus an
# overlap-add. Same arithmetic as the reference, different summation order.


class PackedUnet(nn.Module):
    """A snapshot of ConditionalUnet1D's weights packed for `forward_film` on (B, L, C) activations."""

    def __init__(self, unet):
        super().__init__()
        self.unet = [unet]  # not a submodule: the snapshot owns only its packed copies
        self.packed = nn.ParameterDict()
        self.meta: dict[str, tuple] = {}
        for name, mod in unet.named_modules():
            key = name.replace(".", "_")
            if isinstance(mod, nn.Conv1d):
                (k,), (s,), (p,) = mod.kernel_size, mod.stride, mod.padding
                c_out, c_in = mod.out_channels, mod.in_channels
                w = mod.weight.detach().reshape(c_out, c_in * k).t().contiguous()
                self._put(key, w, mod.bias, ("conv", k, s, p))
            elif isinstance(mod, nn.ConvTranspose1d):
                if (mod.kernel_size, mod.stride, mod.padding) != ((4,), (2,), (1,)):
                    raise ValueError("PackedUnet handles ConvTranspose1d(k=4, s=2, p=1) only")
                c_in, c_out = mod.in_channels, mod.out_channels
                w = mod.weight.detach().reshape(c_in, c_out * 4).contiguous()
                self._put(key, w, mod.bias, ("convT",))
            elif isinstance(mod, nn.GroupNorm):
                self._put(key, mod.weight.detach(), mod.bias, ("gn", mod.num_groups, mod.eps))
        self.names = {mod: name.replace(".", "_") for name, mod in unet.named_modules()}

    def _put(self, key: str, w: torch.Tensor, b: torch.Tensor | None, meta: tuple) -> None:
        self.packed[key + "_w"] = nn.Parameter(w.clone(), requires_grad=False)
        bias = b.detach().clone() if b is not None else torch.zeros(w.shape[-1])
        self.packed[key + "_b"] = nn.Parameter(bias, requires_grad=False)
        self.meta[key] = meta

    def _mod(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        key = self.names[mod]
        w, b = self.packed[key + "_w"], self.packed[key + "_b"]
        kind = self.meta[key]
        bsz, length, c = x.shape
        if kind[0] == "conv":
            _, k, s, p = kind
            if k == 1:
                return torch.addmm(b, x.reshape(bsz * length, c), w).view(bsz, length, -1)
            xp = torch.nn.functional.pad(x, (0, 0, p, p))
            cols = xp.unfold(1, k, s)  # (B, L_out, C, k): flattened as C-major, k-minor like w
            l_out = cols.shape[1]
            return torch.addmm(b, cols.reshape(bsz * l_out, c * k), w).view(bsz, l_out, -1)
        if (
            kind[0] == "convT"
        ):  # o = 2i + j - 1: even o=2m <- (m, 1), (m-1, 3); odd <- (m, 2), (m+1, 0)
            y = (x.reshape(bsz * length, c) @ w).view(bsz, length, -1, 4)
            even = y[..., 1] + torch.nn.functional.pad(y[:, :-1, :, 3], (0, 0, 1, 0))
            odd = y[..., 2] + torch.nn.functional.pad(y[:, 1:, :, 0], (0, 0, 0, 1))
            return torch.stack([even, odd], dim=2).reshape(bsz, 2 * length, -1) + b
        _, groups, eps = kind  # GroupNorm over (L, C/G) per (B, G)
        return torch.nn.functional.group_norm(x.transpose(1, 2), groups, w, b, eps).transpose(1, 2)

    def _conv_block(self, block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        conv, gn, _ = block
        return torch.nn.functional.mish(self._mod(gn, self._mod(conv, x)))

    def _res(self, block, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        h = self._conv_block(block.blocks[0], x)
        c = block.c_out
        if block.cond_predict_scale:
            h = film[:, None, :c] * h + film[:, None, c:]
        else:
            h = h + film[:, None, :]
        h = self._conv_block(block.blocks[1], h)
        res = block.residual_conv
        return h + (self._mod(res, x) if isinstance(res, nn.Conv1d) else x)

    def forward_film(self, sample: torch.Tensor, films: list[torch.Tensor]) -> torch.Tensor:
        """ConditionalUnet1D.forward_film on sample (B, T, Da), without leaving the (B, T, C) layout."""
        u = self.unet[0]
        x, skips, i = sample, [], 0
        for res1, res2, down in u.down_modules:
            x = self._res(res2, self._res(res1, x, films[i]), films[i + 1])
            i += 2
            skips.append(x)
            x = self._mod(down, x) if isinstance(down, nn.Conv1d) else x
        for res in u.mid_modules:
            x = self._res(res, x, films[i])
            i += 1
        for res1, res2, up in u.up_modules:
            x = torch.cat([x, skips.pop()], dim=2)
            x = self._mod(up, self._res(res2, self._res(res1, x, films[i]), films[i + 1]))
            i += 2
        block, head = u.final_conv
        return self._mod(head, self._conv_block(block, x))


# --- the CLI options shared by `dp eval`, `dp serve` and the benchmarks ----------------------------


def add_sampler_arguments(parser) -> None:
    """--sampler, --inference-steps, --timestep-spacing and --backend."""
    parser.add_argument(
        "--sampler", choices=["ddpm", "ddim"], default=None, help="diffusion sampler override"
    )
    parser.add_argument(
        "--inference-steps", type=int, default=None, help="sampler steps override (e.g. DDIM 10)"
    )
    parser.add_argument(
        "--timestep-spacing",
        choices=["leading", "trailing", "linspace"],
        default=None,
        help="which timesteps a K-step sampler visits (trailing starts at t=T-1)",
    )
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="auto",
        help="how DDIM chunks are computed: auto (cpu kernel or CUDA graph), fused, cpu, "
        "cuda_graph, or eager (the reference diffusers loop). DDPM always runs eager.",
    )


def apply_sampler_arguments(policy, args) -> None:
    """Apply the options of add_sampler_arguments to a loaded policy (diffusion policies only)."""
    if not hasattr(policy, "set_sampler"):
        return
    if args.sampler or args.inference_steps or args.timestep_spacing:
        policy.set_sampler(args.sampler, args.inference_steps, args.timestep_spacing)
    policy.set_inference_backend(args.backend)
