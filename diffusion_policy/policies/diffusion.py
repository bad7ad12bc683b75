"""Diffusion Policy (Chi et al., RSS 2023): denoise an action chunk conditioned on observations.

Training (DDPM, L_simple): x_t = sqrt(abar_t) a0 + sqrt(1 - abar_t) eps, loss = ||eps - eps_theta(x_t, t, o)||^2.
Sampling: start from noise and run a diffusers scheduler (DDPM or DDIM) loop written out here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from einops import rearrange
from torch import nn

from diffusion_policy.errors import ConfigError
from diffusion_policy.models.encoders import ObsEncoder
from diffusion_policy.models.transformer import TransformerForDiffusion
from diffusion_policy.models.unet1d import ConditionalUnet1D
from diffusion_policy.policies.base import Policy, PolicyConfig
from diffusion_policy.policies.diffusion_sampling import CPU_TRACE_MAX_BATCH, FastSampler
from diffusion_policy.policies.sampler_names import BACKENDS, SAMPLERS, SPACINGS, TimestepSpacing
from diffusion_policy.shapes import ShapeMeta


@dataclass
class UnetConfig:
    """ConditionalUnet1D sizes; the defaults are the paper's Push-T state model (65.8 M parameters)."""

    diffusion_step_embed_dim: int = 256
    down_dims: list[int] = field(default_factory=lambda: [256, 512, 1024])
    kernel_size: int = 5
    n_groups: int = 8
    cond_predict_scale: bool = True  # FiLM scale and bias (the paper), else bias only

    def __post_init__(self) -> None:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(
                f"policy.unet.kernel_size={self.kernel_size}: must be odd (the convolutions pad by kernel_size // 2)"
            )


BACKBONES = ("unet", "transformer")


@dataclass
class TransformerConfig:
    """TransformerForDiffusion sizes; the defaults are the paper's Push-T low-dim DP-T (8.97 M)."""

    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 256
    p_drop_emb: float = 0.0
    p_drop_attn: float = (
        0.01  # the original's Push-T low-dim value (0.3 on Block Pushing and images)
    )
    causal_attn: bool = True
    n_cond_layers: int = 0  # > 0: a transformer encoder over the conditioning tokens, else an MLP
    # AdamW decay of the observation encoder's parameters (the original's obs_encoder_weight_decay);
    # the transformer's own weights decay by train.optim.weight_decay, its biases, norms and
    # positional embeddings not at all
    obs_encoder_weight_decay: float = 1.0e-6

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_emb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"policy.transformer.{name}={getattr(self, name)}: must be >= 1")
        if self.n_emb % self.n_head:
            raise ConfigError(
                f"policy.transformer.n_emb={self.n_emb} must be divisible by n_head={self.n_head}"
            )
        if self.n_emb < 4 or self.n_emb % 2:
            raise ConfigError(
                f"policy.transformer.n_emb={self.n_emb}: must be even and >= 4 (sinusoidal step embedding)"
            )
        for name in ("p_drop_emb", "p_drop_attn"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(
                    f"policy.transformer.{name}={getattr(self, name)}: must be in [0, 1)"
                )
        if self.n_cond_layers < 0 or self.obs_encoder_weight_decay < 0:
            raise ConfigError(
                "policy.transformer.n_cond_layers and obs_encoder_weight_decay must be >= 0"
            )


@dataclass
class NoiseConfig:
    """The diffusion process; diffusers' schedulers implement it."""

    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: str = "epsilon"  # epsilon | sample
    sampler: str = "ddpm"  # ddpm | ddim
    num_inference_steps: int = 100
    # which K of the T training timesteps a K-step sampler visits (diffusers' timestep_spacing):
    # leading (the original code's: DDIM-10 starts at t=90), trailing (starts at t=T-1), linspace
    timestep_spacing: str = TimestepSpacing.LEADING.value

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "sample"):
            raise ConfigError(
                f"policy.noise.prediction_type={self.prediction_type!r}: expected epsilon or sample"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"policy.noise.sampler={self.sampler!r}: expected ddpm or ddim")
        if self.timestep_spacing not in SPACINGS:
            raise ConfigError(
                f"policy.noise.timestep_spacing={self.timestep_spacing!r}: expected one of {SPACINGS}"
            )
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ConfigError(
                f"policy.noise.num_inference_steps={self.num_inference_steps}: must be in [1, num_train_timesteps={self.num_train_timesteps}]"
            )


@dataclass
class DiffusionConfig(PolicyConfig):
    name: str = "diffusion"
    backbone: str = (
        "unet"  # the denoiser: unet (DP-C, policy.unet) | transformer (DP-T, policy.transformer)
    )
    unet: UnetConfig = field(default_factory=UnetConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)

    @classmethod
    def tiny(cls, backbone: str = "unet") -> DiffusionConfig:
        return cls(
            backbone=backbone,
            unet=UnetConfig(diffusion_step_embed_dim=16, down_dims=[16, 32]),
            transformer=TransformerConfig(n_layer=2, n_head=2, n_emb=16),
            noise=NoiseConfig(num_inference_steps=4),
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backbone not in BACKBONES:
            raise ConfigError(
                f"policy.backbone={self.backbone!r}: expected one of {', '.join(BACKBONES)}"
            )
        if self.backbone == "unet":
            self._check_unet()

    def _check_unet(self) -> None:
        bad = [d for d in self.unet.down_dims if d % self.unet.n_groups]
        if bad:
            raise ConfigError(
                f"policy.unet.down_dims={self.unet.down_dims}: {bad} not divisible by n_groups={self.unet.n_groups}"
            )
        factor = 2 ** (len(self.unet.down_dims) - 1)
        if self.horizon % factor:
            raise ConfigError(
                f"policy.horizon={self.horizon} must be divisible by 2^(len(unet.down_dims)-1) = {factor}"
            )


def make_scheduler(cfg: NoiseConfig, kind: str | None = None) -> DDPMScheduler | DDIMScheduler:
    kind = kind or cfg.sampler
    common = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        clip_sample=cfg.clip_sample,
        prediction_type=cfg.prediction_type,
        timestep_spacing=cfg.timestep_spacing,
    )
    if kind == "ddpm":
        return DDPMScheduler(variance_type="fixed_small", **common)
    return DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **common)


def build_denoiser(config: DiffusionConfig, action_dim: int, obs_feature_dim: int) -> nn.Module:
    """The backbone `model(sample (B, T, Da), timestep, cond) -> (B, T, Da)` that policy.backbone names."""
    if config.backbone == "transformer":
        sizes = dataclasses.asdict(config.transformer)
        sizes.pop("obs_encoder_weight_decay")  # the optimiser's, not the network's
        return TransformerForDiffusion(
            action_dim, obs_feature_dim, config.horizon, config.n_obs_steps, **sizes
        )
    u = config.unet
    return ConditionalUnet1D(
        input_dim=action_dim,
        global_cond_dim=obs_feature_dim * config.n_obs_steps,
        diffusion_step_embed_dim=u.diffusion_step_embed_dim,
        down_dims=list(u.down_dims),
        kernel_size=u.kernel_size,
        n_groups=u.n_groups,
        cond_predict_scale=u.cond_predict_scale,
    )


class DiffusionPolicy(Policy):
    """Observation encoder + a denoiser (ConditionalUnet1D or TransformerForDiffusion); actions
    normalised to [-1, 1]."""

    graph_safe = True

    def __init__(self, config: DiffusionConfig, shape_meta: ShapeMeta):
        super().__init__(config, shape_meta)
        self.obs_encoder = ObsEncoder(config.encoder, shape_meta)
        self.model = build_denoiser(config, shape_meta.action_dim, self.obs_encoder.output_dim)
        self.noise_scheduler = make_scheduler(config.noise, "ddpm")  # training: the forward process
        self.sampler = make_scheduler(config.noise)
        self.sampler_kind = config.noise.sampler
        self.num_inference_steps = config.noise.num_inference_steps
        self.inference_backend = "eager"
        self._fast: FastSampler | None = None

    def configure_sampler(
        self,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        backend: str = "auto",
    ) -> None:
        if sampler or steps or spacing:
            self.set_sampler(sampler, steps, spacing)
        self.set_inference_backend(backend)

    def set_sampler(
        self,
        kind: str | None = None,
        num_inference_steps: int | None = None,
        timestep_spacing: str | None = None,
    ) -> None:
        """Switch the sampling scheduler (ddpm | ddim), its step count or spacing, e.g. DDIM-10 for serving."""
        noise = self.config.noise
        if timestep_spacing is not None:
            if timestep_spacing not in SPACINGS:
                raise ConfigError(
                    f"timestep_spacing={timestep_spacing!r}: expected one of {SPACINGS}"
                )
            noise = dataclasses.replace(noise, timestep_spacing=timestep_spacing)
            self.config.noise = noise
        if kind is not None and kind not in SAMPLERS:
            raise ConfigError(f"sampler={kind!r}: expected ddpm or ddim")
        self.sampler_kind = kind or self.sampler_kind
        self.sampler = make_scheduler(noise, self.sampler_kind)
        if num_inference_steps is not None:
            if not 1 <= num_inference_steps <= noise.num_train_timesteps:
                raise ConfigError(
                    f"num_inference_steps={num_inference_steps}: must be in [1, {noise.num_train_timesteps}]"
                )
            self.num_inference_steps = num_inference_steps
        self._fast = None

    def set_inference_backend(self, backend: str) -> None:
        """How DDIM chunks are computed: eager (the reference diffusers loop) or a FastSampler backend

        (fused | cpu | cuda_graph | auto; see diffusion_policy/sampling.py). DDPM always runs eager:
        its per-step noise is drawn from the caller's generator.
        """
        if backend not in BACKENDS:
            raise ConfigError(f"inference backend {backend!r}: expected one of {BACKENDS}")
        if backend == "cuda_graph" and self.device.type != "cuda":
            raise ConfigError("inference backend cuda_graph needs the policy on a CUDA device")
        if backend == "cpu" and self.device.type != "cpu":
            raise ConfigError(
                f"inference backend cpu needs the policy on the CPU, not {self.device}"
            )
        self.inference_backend = backend
        self._fast = None

    # --- inference facts (the contract in policies/base.py) -------------------------------------
    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.config.horizon, self.shape_meta.action_dim)

    def deterministic_given_noise(self) -> bool:
        # DDIM's step with the policy's eta = 0 adds no noise; DDPM's adds fresh noise every step.
        return self.sampler_kind == "ddim"

    def inference_backends(self) -> tuple[str, ...]:
        return BACKENDS

    def guidances(self) -> tuple[str, ...]:
        # rtc differentiates through the UNet in the eager loop, whatever the backend
        return ("none", "rtc", "bid")

    def _active_backend(self) -> str:
        """The backend chunks really run on: auto resolved for the device; DDPM always eager."""
        if self.sampler_kind != "ddim" or self.inference_backend == "eager":
            return "eager"
        if self.inference_backend == "auto":
            return "cuda_graph" if self.device.type == "cuda" else "cpu"
        return self.inference_backend

    def builds_per_batch_size(self) -> bool:
        return self._active_backend() in ("cpu", "cuda_graph")

    def prepare_concurrently(self) -> bool:
        # A trace reads the shared weights only. The eager loop sets the scheduler's timesteps on
        # every call, and a CUDA graph capture must not overlap other work on the device.
        return self._active_backend() == "cpu"

    def prepare_inference(self, batch_size: int) -> None:
        obs = self.zero_obs(batch_size)
        noise = torch.zeros(self.noise_shape(batch_size))
        # a trace is built on the first call and optimised by the JIT's profiling run on the second
        for _ in range(3 if self.builds_per_batch_size() else 1):
            self.predict_action_chunk(obs, noise=noise)

    def sampler_settings(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler_kind,
            "num_inference_steps": self.num_inference_steps,
            "timestep_spacing": self.config.noise.timestep_spacing,
            "backend": self._active_backend(),
        }

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half(): cached samplers hold old tensors
        self._fast = None
        return super()._apply(fn, recurse)

    def condition(self, nobs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised obs {key: (B, To, ...)} -> the denoiser's cond: one token per obs step
        (B, To, Do) for the transformer, flattened time-major (B, To * Do) for the UNet."""
        feats = self.obs_encoder({k: v[:, : self.config.n_obs_steps] for k, v in nobs.items()})
        if self.config.backbone == "transformer":
            return feats
        return rearrange(feats, "b to d -> b (to d)")

    global_cond = (
        condition  # its name before the transformer backbone (callers written for the UNet)
    )

    def optim_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The UNet: one group. The transformer: the original's split, decay on Linear and attention
        weights only (none on biases, LayerNorms, positional embeddings), its own for the encoder."""
        if self.config.backbone != "transformer":
            return super().optim_groups(weight_decay)
        decay, no_decay = self.model.decay_split()
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        encoder = list(self.obs_encoder.parameters())
        if encoder:
            wd = self.config.transformer.obs_encoder_weight_decay
            groups.append({"params": encoder, "weight_decay": wd})
        return groups

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        cond = self.condition(self.normalize_obs(batch["obs"]))
        action = self.normalizer.normalize("action", batch["action"])  # (B, T, Da)
        if (
            "noise" in batch
        ):  # per-sample randomness drawn by the trainer (see sample_training_noise)
            noise, t = batch["noise"], batch["timesteps"]
        else:
            drawn = self.sample_training_noise(action.shape[0], None, action.device)
            noise, t = drawn["noise"], drawn["timesteps"]
        noisy = self.noise_scheduler.add_noise(action, noise, t)
        pred = self.model(noisy, t, cond)
        target = noise if self.config.noise.prediction_type == "epsilon" else action
        return F.mse_loss(pred, target)

    def sample_training_noise(
        self,
        batch_size: int,
        generator: torch.Generator | None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss's randomness for `batch_size` samples: eps ~ N(0, I) and t ~ U{0..K-1}."""
        device = generator.device if generator is not None else (device or self.device)
        shape = (batch_size, self.config.horizon, self.shape_meta.action_dim)
        k = self.config.noise.num_train_timesteps
        return {
            "noise": torch.randn(shape, generator=generator, device=device),
            "timesteps": torch.randint(0, k, (batch_size,), generator=generator, device=device),
        }

    @torch.no_grad()
    def conditional_sample(
        self,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        guide: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Reverse diffusion from noise (B, T, Da); deterministic given `generator` or `noise`.

        `guide(x_t, t)`, when given, replaces the model's output at every step (guidance.RTCGuide).
        """
        shape = (cond.shape[0], self.config.horizon, self.shape_meta.action_dim)
        if noise is None:
            noise = torch.randn(
                shape,
                generator=generator,
                device=generator.device if generator is not None else cond.device,
            )
        x = noise.to(device=cond.device, dtype=cond.dtype)
        self.sampler.set_timesteps(self.num_inference_steps, device=cond.device)
        for t in self.sampler.timesteps:
            out = self.model(x, t, cond) if guide is None else guide(x, t)
            x = self.sampler.step(out, t, x, generator=generator).prev_sample
        return x

    @torch.no_grad()
    def predict_action_chunk(
        self,
        obs: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        obs = self.check_obs(obs)
        if self._fast_applies(next(iter(obs.values())).shape[0]):
            action_pred = self._fast_sample(obs, generator, noise)
        else:
            cond = self.condition(self.normalize_obs(obs))
            naction = self.conditional_sample(cond, generator=generator, noise=noise)
            action_pred = self.normalizer.unnormalize("action", naction)
        return {
            "action": action_pred[:, self.executed_slice()],
            "action_pred": action_pred,
        }

    def _fast_applies(self, batch: int) -> bool:
        """DDIM through a FastSampler backend, except the traced CPU kernel above its batch limit."""
        backend = self._active_backend()
        if backend == "eager":
            return False
        return backend != "cpu" or batch <= CPU_TRACE_MAX_BATCH

    def _fast_sample(
        self,
        obs: dict[str, torch.Tensor],
        generator: torch.Generator | None,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        batch = next(iter(obs.values())).shape[0]
        shape = (batch, self.config.horizon, self.shape_meta.action_dim)
        if noise is None:  # the same draw as conditional_sample, so both paths agree
            noise = torch.randn(
                shape,
                generator=generator,
                device=generator.device if generator is not None else self.device,
            )
        if self._fast is None or self._fast.module.num_steps != self.num_inference_steps:
            self._fast = FastSampler(self, self.num_inference_steps, self.inference_backend)
        return self._fast(obs, noise.to(self.device, torch.float32))
