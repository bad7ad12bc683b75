"""The policy contract shared by every algorithm, and the timing of observations against actions.

Timing for To = n_obs_steps = 2, T = horizon = 16, Ta = n_action_steps = 8 (one column per env step):

    step k:      0   1   2   3   4   5   6   7   8   9  10  11  12  13  14  15
    obs:       |o0 |o1 |                                                       <- the To newest observations
    action:    |a0 |a1 |a2 |a3 |a4 |a5 |a6 |a7 |a8 |a9 |a10|a11|a12|a13|a14|a15|  <- predicted chunk (T)
    executed:       |a1 |a2 |a3 |a4 |a5 |a6 |a7 |a8 |                         <- [To-1, To-1+Ta)

obs[k] and action[k] belong to the same step: action[k] is the command issued right after seeing
obs[k]. The first executed action answers the newest observation (k = To - 1); after Ta steps the
policy is queried again with the To newest observations (receding horizon).

Vocabulary: B batch, To obs steps, T horizon, Ta executed steps, Da action dim, Do obs feature dim.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusion_policy.errors import ConfigError, ObservationError
from diffusion_policy.models.encoders import EncoderConfig
from diffusion_policy.models.normalizer import LinearNormalizer
from diffusion_policy.models.vision import check_image_obs
from diffusion_policy.shapes import ShapeMeta


@dataclass
class PolicyConfig:
    """Fields every policy has. Algorithms subclass it and add their own."""

    name: str = "base"
    horizon: int = 16  # T: length of the predicted action chunk
    n_obs_steps: int = 2  # To: observations the policy conditions on
    n_action_steps: int = 8  # Ta: actions executed before re-planning
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    @classmethod
    def tiny(cls) -> PolicyConfig:
        """A minimal configuration for tests and smoke runs; algorithms shrink their networks here."""
        return cls()

    def __post_init__(self) -> None:
        for k in ("horizon", "n_obs_steps", "n_action_steps"):
            if getattr(self, k) < 1:
                raise ConfigError(f"policy.{k}={getattr(self, k)}: must be >= 1")
        if self.n_obs_steps + self.n_action_steps - 1 > self.horizon:
            raise ConfigError(
                f"policy: n_obs_steps + n_action_steps - 1 = {self.n_obs_steps + self.n_action_steps - 1} "
                f"exceeds horizon={self.horizon}; the executed actions must lie inside the predicted chunk"
            )


class Policy(nn.Module, ABC):
    """obs (B, To, ...) -> action chunk. Normalisation lives inside, in the state dict."""

    def __init__(self, config: PolicyConfig, shape_meta: ShapeMeta):
        super().__init__()
        self.config = config
        self.shape_meta = shape_meta
        dims = {"action": shape_meta.action_dim}
        dims.update(
            {k: math.prod(s.shape) for k, s in shape_meta.obs.items() if s.kind == "low_dim"}
        )
        self.normalizer = LinearNormalizer(dims)

    # --- the contract -------------------------------------------------------------------------
    @abstractmethod
    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """batch: {"obs": {key: (B, To, ...)}, "action": (B, T, Da)} in raw units -> scalar loss."""

    @abstractmethod
    def predict_action_chunk(
        self,
        obs: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """obs {key: (B, To, ...)} raw -> {"action": (B, Ta, Da), "action_pred": (B, T, Da)} raw units.

        `noise` of shape `noise_shape(B)` is the initial noise; only policies whose `noise_shape`
        is not None take it.
        """

    # True when compute_loss has no host synchronisation, no data-dependent Python control flow and
    # takes all its randomness from the batch (sample_training_noise): then the trainer may capture
    # the training step in a CUDA graph (diffusion_policy/train_graph.py).
    graph_safe: bool = False

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss, so DistributedDataParallel can wrap the policy."""
        return self.compute_loss(batch)

    def reset(self) -> None:
        """Clear any per-episode state (none for the built-in policies)."""

    def optim_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW's parameter groups, `weight_decay` being train.optim.weight_decay. A policy whose
        parameters need different regularisation (DP-T: none on biases and norms) splits them here;
        the default is one group of every parameter at that decay."""
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]

    # --- inference facts: what a server or an exporter may rely on instead of guessing ------------
    def noise_shape(self, batch_size: int) -> tuple[int, ...] | None:
        """Shape of the initial noise `predict_action_chunk(noise=...)` takes for `batch_size` rows,

        drawn as `torch.randn(shape, generator=g)` exactly as the call draws it from `generator`;
        None when the policy takes no explicit noise.
        """
        return None

    def deterministic_given_noise(self) -> bool:
        """True when each row of a chunk is a function of that row's observation and noise alone.

        Then rows of different requests may share one forward pass, each with its own noise, and a
        batch may be padded with extra rows. False when sampling draws more randomness (DDPM's
        per-step noise, IBC's candidates): only the generator reproduces a chunk.
        """
        return False

    def inference_backends(self) -> tuple[str, ...]:
        """The names `set_inference_backend` accepts; the active one is `inference_backend`."""
        return ("eager",)

    inference_backend: str = "eager"

    def guidances(self) -> tuple[str, ...]:
        """What `guidance.plan_chunk` may do with this policy given the executing plan's prefix:
        "none" (plain chunks), "bid" (best of N samples: any stochastic policy), "rtc" (guided
        inpainting: needs a differentiable denoiser). The base policy claims plain chunks only."""
        return ("none",)

    def set_inference_backend(self, backend: str) -> None:
        """Choose how chunks are computed (one of `inference_backends()`)."""
        if backend not in self.inference_backends():
            raise ConfigError(
                f"inference backend {backend!r}: expected one of {self.inference_backends()}"
            )
        self.inference_backend = backend

    def configure_sampler(
        self,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        backend: str = "auto",
    ) -> None:
        """The sampler options of `dp eval`/`dp serve` (None: keep the checkpoint's). A policy
        without a diffusion sampler (IBC) has nothing to configure and ignores them."""

    def builds_per_batch_size(self) -> bool:
        """True when the active backend builds a kernel per batch size (a trace, a CUDA graph).

        The first chunk at an unbuilt size then pays the build (seconds on a CPU), so a server
        prepares a few sizes with `prepare_inference` and pads each batch up to a prepared one.
        """
        return False

    def prepare_concurrently(self) -> bool:
        """True when `prepare_inference` may run in another thread while this policy answers
        `predict_action_chunk` at sizes already prepared (else prepare before serving)."""
        return False

    def prepare_inference(self, batch_size: int) -> None:
        """Build and warm up what a chunk of `batch_size` rows runs (first-call allocations, a trace
        and its optimising runs, a graph capture), so the first real chunk at that size is as
        fast as the rest. Runs on zeros; changes no state that a chunk depends on."""
        gen = torch.Generator(self.device).manual_seed(0)
        self.predict_action_chunk(self.zero_obs(batch_size), generator=gen)

    def zero_obs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """An all-zero observation {key: (B, To, ...)} of the right shapes and dtypes (warm-ups)."""
        return {
            k: torch.zeros(
                (batch_size, self.config.n_obs_steps, *s.shape), dtype=getattr(torch, s.dtype)
            )
            for k, s in self.shape_meta.obs.items()
        }

    def sampler_settings(self) -> dict[str, Any]:
        """What decides a chunk besides the weights, the observation and the noise (for a server's
        metadata and a checkpoint identity): the sampler, its steps, the backend."""
        return {"sampler": None, "num_inference_steps": None, "backend": self.inference_backend}

    def observation_ranges(self) -> dict[str, tuple[float, float]]:
        """(min, max) of each fitted low-dim observation key over the training data: what an
        observation far outside of is likely in other units."""
        out = {}
        for key, spec in self.shape_meta.obs.items():
            if spec.kind == "low_dim" and self.normalizer.is_fitted(key):
                s = self.normalizer.stats(key)
                out[key] = (float(s["min"].min()), float(s["max"].max()))
        return out

    # --- shared helpers -----------------------------------------------------------------------
    def executed_slice(self) -> slice:
        """Chunk indices [To-1, To-1+Ta) that are executed (see the timing diagram above)."""
        start = self.config.n_obs_steps - 1
        return slice(start, start + self.config.n_action_steps)

    def fit_normalizer(self, data: dict[str, np.ndarray], mode: str = "limits") -> None:
        """Fit from all frames of the dataset (spec §2.5): action and every low-dim obs key, each in
        its declared mode (shape_meta: minmax -> `mode`, identity -> raw values)."""
        modes = {
            k: mode if m == "minmax" else m for k, m in self.shape_meta.normalize_modes().items()
        }
        self.normalizer.fit(
            {k: v for k, v in data.items() if k in self.normalizer.dims}, mode=modes
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Low-dim keys through the fitted normaliser; images stay raw uint8 for the encoder."""
        out = {}
        for key, spec in self.shape_meta.obs.items():
            x = obs[key]
            out[key] = (
                self.normalizer.normalize(key, x.float().reshape(*x.shape[:2], -1))
                if spec.kind == "low_dim"
                else x
            )
        return out

    def check_obs(self, obs: dict[str, Any], n_steps: int | None = None) -> dict[str, torch.Tensor]:
        """Validate keys, shapes and dtypes of (B, To, ...) observations; return tensors on our device."""
        if not isinstance(obs, dict):
            raise ObservationError(
                f"observation must be a dict of arrays, got {type(obs).__name__}"
            )
        n_steps = self.config.n_obs_steps if n_steps is None else n_steps
        missing = [k for k in self.shape_meta.obs if k not in obs]
        if missing:
            raise ObservationError(
                f"observation is missing key(s) {missing} (expected {list(self.shape_meta.obs)})"
            )
        out, batch = {}, None
        for key, spec in self.shape_meta.obs.items():
            x = obs[key]
            x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
            want = (n_steps, *spec.shape)
            rgb = spec.kind == "rgb"
            if rgb:  # uint8 HWC at the trained size (any size when the encoder resizes)
                check_image_obs(
                    key,
                    x,
                    want,
                    any_size=(spec.resize or self.config.encoder.resize_shape) is not None,
                )
            bad_batch = batch is not None and x.shape[0] != batch
            if (not rgb and tuple(x.shape[1:]) != want) or bad_batch:
                raise ObservationError(
                    f"obs[{key!r}] has shape {tuple(x.shape)}, expected (B, {', '.join(map(str, want))}) {spec.dtype}"
                )
            batch = x.shape[0]
            if not rgb:
                if not (x.dtype.is_floating_point or x.dtype in (torch.int32, torch.int64)):
                    raise ObservationError(f"obs[{key!r}] has dtype {x.dtype}, expected float32")
                x = x.float()
                if not torch.isfinite(x).all():
                    raise ObservationError(f"obs[{key!r}] contains NaN or Inf")
            out[key] = x.to(self.device)
        return out
