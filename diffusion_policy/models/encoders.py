"""Observation encoders: an obs dict (B, To, ...) -> features (B, To, D), with `output_dim` = D.

Low-dim keys (already normalised by the policy) are concatenated in shape-meta order, optionally
through an MLP. Image keys (uint8 HWC) each get their own vision encoder; their features come first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffusion_policy.errors import ConfigError

if TYPE_CHECKING:
    from diffusion_policy.shapes import ObsSpec, ShapeMeta


# image encoder names (policy.encoder.image); built by build_image_encoder
IMAGE_ENCODERS = ("resnet18_spatial_softmax",)


@dataclass
class EncoderConfig:
    """How observations become the conditioning features."""

    low_dim: str = "identity"  # identity | mlp
    mlp_hidden: list[int] = field(default_factory=lambda: [256])
    mlp_out: int = 64
    image: str = "resnet18_spatial_softmax"  # the paper's robomimic-style encoder
    crop_shape: list[int] = field(
        default_factory=lambda: [84, 84]
    )  # random crop in train, center in eval
    num_keypoints: int = 32
    image_feature_dim: int = 64
    resnet_width: int = 64  # ResNet-18 stages w, 2w, 4w, 8w; the paper's 64 (a multiple of 16)
    resize_shape: list[int] | None = None  # resize every image to [H, W] before cropping; None: the
    # input must have the trained resolution exactly (a mismatch is an error, never a shifted crop)

    def __post_init__(self) -> None:
        if self.low_dim not in ("identity", "mlp"):
            raise ConfigError(f"policy.encoder.low_dim={self.low_dim!r}: expected identity or mlp")
        if self.image not in IMAGE_ENCODERS:
            raise ConfigError(
                f"policy.encoder.image={self.image!r}: expected one of {', '.join(IMAGE_ENCODERS)}"
            )
        for name in ("crop_shape", "resize_shape"):
            v = getattr(self, name)
            if v is not None and (len(v) != 2 or min(v) < 1):
                raise ConfigError(f"policy.encoder.{name}={list(v)}: expected [height, width] >= 1")
        for name in ("num_keypoints", "image_feature_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"policy.encoder.{name}={getattr(self, name)}: must be >= 1")
        size = self.resize_shape
        if size is not None and (self.crop_shape[0] > size[0] or self.crop_shape[1] > size[1]):
            raise ConfigError(
                f"policy.encoder.crop_shape={list(self.crop_shape)} must fit inside "
                f"policy.encoder.resize_shape={list(size)}"
            )
        if self.resnet_width < 16 or self.resnet_width % 16:
            raise ConfigError(
                f"policy.encoder.resnet_width={self.resnet_width}: must be a positive multiple of 16 "
                "(GroupNorm uses C/16 groups)"
            )


class LowDimEncoder(nn.Module):
    """Concatenate low-dim keys; identity keeps the paper's raw normalised observations."""

    def __init__(self, keys: list[str], dims: list[int], cfg: EncoderConfig):
        super().__init__()
        self.keys = keys
        d_in = sum(dims)
        if cfg.low_dim == "mlp" and d_in > 0:
            layers: list[nn.Module] = []
            for h in cfg.mlp_hidden:
                layers += [nn.Linear(d_in, h), nn.Mish()]
                d_in = h
            layers.append(nn.Linear(d_in, cfg.mlp_out))
            self.net: nn.Module = nn.Sequential(*layers)
            self.output_dim = cfg.mlp_out
        else:
            self.net = nn.Identity()
            self.output_dim = d_in

    def forward(
        self, obs: dict[str, torch.Tensor]
    ) -> torch.Tensor:  # {key: (B, To, Dk)} -> (B, To, D)
        return self.net(torch.cat([obs[k] for k in self.keys], dim=-1))


class ObsEncoder(nn.Module):
    """Image encoders (one per camera key) then the low-dim encoder, concatenated per time step."""

    def __init__(self, cfg: EncoderConfig, shape_meta: ShapeMeta):
        super().__init__()
        import math

        rgb = [k for k, s in shape_meta.obs.items() if s.kind == "rgb"]
        low = [k for k, s in shape_meta.obs.items() if s.kind == "low_dim"]
        self.image_encoders = nn.ModuleDict(
            {k: image_encoder_for(cfg, shape_meta.obs[k], key=k) for k in rgb}
        )
        self.low_dim = LowDimEncoder(low, [math.prod(shape_meta.obs[k].shape) for k in low], cfg)
        self.output_dim = (
            sum(e.output_dim for e in self.image_encoders.values()) + self.low_dim.output_dim
        )

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = [enc(obs[k]) for k, enc in self.image_encoders.items()]
        if self.low_dim.keys:
            feats.append(self.low_dim(obs))
        return torch.cat(feats, dim=-1)


def image_encoder_for(cfg: EncoderConfig, spec: ObsSpec, key: str) -> nn.Module:
    """The encoder of one camera: its own resize and crop where the task declares them, else the
    policy's (policy.encoder.resize_shape / crop_shape)."""
    return build_image_encoder(cfg, spec.shape, key=key, resize=spec.resize, crop=spec.crop)


def build_image_encoder(
    cfg: EncoderConfig,
    shape: tuple[int, ...],
    key: str = "image",
    resize: tuple[int, int] | list[int] | None = None,
    crop: tuple[int, int] | list[int] | None = None,
) -> nn.Module:
    """(B, To, H, W, 3) uint8 -> (B, To, F); `output_dim` = F. The paper's encoder (spec §3.2).
    `resize`/`crop` default to the config's resize_shape/crop_shape."""
    from diffusion_policy.models.vision import ImageEncoder

    if cfg.image not in IMAGE_ENCODERS:
        raise ConfigError(
            f"policy.encoder.image={cfg.image!r}: expected one of {', '.join(IMAGE_ENCODERS)}"
        )
    resize = resize if resize is not None else cfg.resize_shape
    crop = crop if crop is not None else cfg.crop_shape
    return ImageEncoder(
        tuple(shape),
        crop_shape=(crop[0], crop[1]),
        num_keypoints=cfg.num_keypoints,
        feature_dim=cfg.image_feature_dim,
        width=cfg.resnet_width,
        resize_shape=None if resize is None else (resize[0], resize[1]),
        key=key,
    )
