"""The paper's vision encoder for image observations (spec §3.2, robomimic's VisualCore as Diffusion
Policy's hybrid Push-T model uses it): uint8 HWC frames -> random/center crop -> [-1, 1] ->
ResNet-18 trunk with GroupNorm -> SpatialSoftmax keypoints -> Linear -> ReLU.

Shapes: (B, To, H, W, 3) uint8 in, (B, To, F) out; every frame is encoded independently.

Why the ResNet-18 is written here rather than imported from torchvision: torchvision wheels from PyPI
do not load beside the CPU-only torch build we develop on ("operator torchvision::nms does not
exist"), and a model module should not need an image-ops library for one network. The modules keep
torchvision's exact structure and names (conv1, bn1, layer1..4 of BasicBlocks with conv1/bn1/conv2/
bn2/downsample.0/.1; avgpool and fc dropped): parameter names and shapes match
`torchvision.models.resnet18()` one for one, and its state dicts load by name with
`load_state_dict(strict=False)` (BatchNorm's running statistics have no GroupNorm counterpart).
tests/test_vision.py compares the two whenever torchvision is importable.

Why GroupNorm: the paper replaces every BatchNorm by GroupNorm(C/16, C) because BatchNorm's running
statistics do not survive the EMA of the weights.

Why crops happen here, in batches: the dataset keeps frames as uint8 on the training device, so the
crop is one gather over all B * To frames from per-frame offsets, done before the float conversion
(4x less memory traffic) and on the GPU when training there. No per-sample Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_policy.errors import ConfigError, ObservationError

# --- ResNet-18 (torchvision layout, GroupNorm) --------------------------------------------------


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(C/16, C), as in the paper; 16 channels per group."""
    if channels % 16:
        raise ConfigError(f"GroupNorm(C/16, C) needs channels divisible by 16, got {channels}")
    return nn.GroupNorm(channels // 16, channels)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 strided conv + norm on the residual when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = group_norm(c_out)  # the name torchvision gives its BatchNorm
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = group_norm(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), group_norm(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Trunk(nn.Module):
    """torchvision's resnet18 without avgpool and fc: (N, 3, H, W) -> (N, 8w, ~H/32, ~W/32).

    `width` (64 in the paper) scales every stage (w, 2w, 4w, 8w) for cheaper CPU models; it must be a
    multiple of 16 so GroupNorm(C/16, C) is defined.
    """

    def __init__(self, width: int = 64):
        super().__init__()
        if width < 16 or width % 16:
            raise ConfigError(
                f"policy.encoder.resnet_width={width}: must be a positive multiple of 16"
            )
        self.width = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = group_norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(width, width, 1)
        self.layer2 = self._stage(width, 2 * width, 2)
        self.layer3 = self._stage(2 * width, 4 * width, 2)
        self.layer4 = self._stage(4 * width, 8 * width, 2)
        self.out_channels = 8 * width
        # torchvision's initialisation (no pretrained weights in the paper either)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# --- SpatialSoftmax ------------------------------------------------------------------------------


class SpatialSoftmax(nn.Module):
    """Feature map (N, C, H, W) -> K expected image positions (N, 2K) in [-1, 1].

    A 1x1 conv makes K keypoint maps; a softmax over the H*W positions of each (temperature fixed at
    1) gives a distribution whose mean (x, y) on a linspace(-1, 1) grid is the keypoint. Output order
    is (x0, y0, x1, y1, ...), as robomimic's.
    """

    def __init__(self, in_channels: int, num_keypoints: int = 32, temperature: float = 1.0):
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_keypoints, 1)
        self.num_keypoints = num_keypoints
        self.temperature = temperature
        self.output_dim = 2 * num_keypoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        logits = self.keypoints(x).flatten(2) / self.temperature  # (N, K, H*W)
        attn = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        ys, xs = torch.meshgrid(
            torch.linspace(-1.0, 1.0, h, device=x.device, dtype=attn.dtype),
            torch.linspace(-1.0, 1.0, w, device=x.device, dtype=attn.dtype),
            indexing="ij",
        )
        grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # (H*W, 2): (x, y)
        return (attn @ grid).flatten(1)  # (N, K, 2) -> (N, 2K)


# --- crops ---------------------------------------------------------------------------------------


def crop_offsets(
    n: int,
    size: tuple[int, int],
    crop: tuple[int, int],
    random: bool,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Top-left corners (n, 2) as (row, col): uniform in [0, H - h) x [0, W - w) when `random`
    (robomimic's range, so 0..11 for 96 -> 84), else the center ((H - h) // 2, (W - w) // 2).

    Random offsets are drawn on the CPU (from `generator`, or torch's default CPU generator, which the
    trainer seeds and checkpoints, so resumed runs repeat their crops); only (n, 2) ints move to `device`.
    """
    (hh, ww), (ch, cw) = size, crop
    if not random:
        return torch.tensor([(hh - ch) // 2, (ww - cw) // 2], device=device).expand(n, 2)
    hi = torch.tensor([max(hh - ch, 1), max(ww - cw, 1)])
    src = generator.device if generator is not None else torch.device("cpu")
    offsets = (torch.rand(n, 2, generator=generator, device=src) * hi.to(src)).long()
    return offsets.to(device, non_blocking=True)


def crop_images(x: torch.Tensor, offsets: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """x (N, H, W, C) -> (N, C, h, w): image i cut at offsets[i] = (row, col), channels moved
    first, in one gather for the whole batch (the result keeps x's channels-last memory order).

    x.unfold twice is a view of every possible window, (N, H-h+1, W-w+1, C, h, w); indexing it with
    (image, row, col) copies just the chosen windows. Measured against other batched forms in
    docs/BENCHMARKS.md "Image policy".
    """
    ch, cw = crop
    windows = x.unfold(1, ch, 1).unfold(2, cw, 1)  # no copy
    n = torch.arange(x.shape[0], device=x.device)
    return windows[n, offsets[:, 0], offsets[:, 1]]


def center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """x (N, H, W, C) -> (N, C, h, w) view: the middle window, offsets ((H-h)//2, (W-w)//2)."""
    (hh, ww), (ch, cw) = x.shape[1:3], crop
    top, left = (hh - ch) // 2, (ww - cw) // 2
    return x[:, top : top + ch, left : left + cw].permute(0, 3, 1, 2)


class CropRandomizer(nn.Module):
    """Random crop per image in train mode, the center crop in eval mode (the paper's eval_fixed_crop).

    (N, H, W, C) -> (N, C, h, w): the crop also moves channels first, since both need one copy.
    """

    def __init__(self, crop_shape: tuple[int, int]):
        super().__init__()
        self.crop_shape = (int(crop_shape[0]), int(crop_shape[1]))
        self.generator: torch.Generator | None = None  # None: torch's default CPU generator
        # set by a CUDA-graphed training step, which draws the offsets outside the graph
        self.graph_offsets: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, hh, ww, _ = x.shape
        if not self.training or (hh, ww) == self.crop_shape:
            return center_crop(x, self.crop_shape)
        if self.graph_offsets is not None:
            return crop_images(x, self.graph_offsets, self.crop_shape)
        offsets = crop_offsets(n, (hh, ww), self.crop_shape, True, x.device, self.generator)
        return crop_images(x, offsets, self.crop_shape)


# --- input checks --------------------------------------------------------------------------------


def check_image_obs(
    key: str, x: torch.Tensor, want: tuple[int | str, ...], any_size: bool = False
) -> None:
    """Raise ObservationError unless x is (B, *want) uint8 HWC; want = (To, H, W, 3).

    Names the key, the shape and dtype given and expected, and the likely mistake (channels-first
    frames, float images, another resolution). With `any_size`, H and W may differ (the encoder
    resizes).
    """
    to, h, w, c = want
    expect = f"expected (B, {to}, {h}, {w}, {c}) uint8 HWC RGB"
    got = f"obs[{key!r}] has shape {tuple(x.shape)} and dtype {x.dtype}, {expect}"
    if x.ndim != 5 or x.shape[1] != to or x.shape[-1] != c:
        chw = x.ndim == 5 and x.shape[2] == c and x.shape[-1] != c
        raise ObservationError(
            got + (": these look channels-first (CHW); move channels last" if chw else "")
        )
    if x.dtype != torch.uint8:
        raise ObservationError(
            got + ": images are uint8 0..255 (floats in [0, 1]: multiply by 255 and round)"
        )
    if not any_size and tuple(x.shape[2:4]) != (h, w):
        raise ObservationError(
            f"{got}: the policy was trained on {h}x{w} images and does not crop others; resize "
            f"them to {h}x{w}, or set policy.encoder.resize_shape: [{h}, {w}] (in the checkpoint's "
            "config.yaml for a trained policy) to let the encoder resize any input"
        )


def to_unit_range(img: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) 0..255 in any memory order -> float32 x / 255 * 2 - 1 in channels-last memory
    order (what the trunk's convolutions run fastest on), in one copy."""
    return img.to(torch.float32, memory_format=torch.channels_last).div_(127.5).sub_(1.0)


# --- the encoder ---------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """One camera: (B, To, H, W, 3) uint8 -> (B, To, F) features; `output_dim` = F.

    Per frame: [resize to `resize_shape`] -> crop `crop_shape` (random in train, center in eval) ->
    x / 255 * 2 - 1 -> ResNet-18 (GroupNorm) -> SpatialSoftmax(num_keypoints) -> Linear -> ReLU.
    Without `resize_shape` the input must be exactly `input_shape`; a different resolution is an
    ObservationError rather than a silently shifted crop.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        crop_shape: tuple[int, int] = (84, 84),
        num_keypoints: int = 32,
        feature_dim: int = 64,
        width: int = 64,
        resize_shape: tuple[int, int] | None = None,
        key: str = "image",
    ):
        super().__init__()
        self.key = key
        if len(input_shape) != 3 or input_shape[-1] != 3:
            hint = (
                " (channels-first? images are HWC)"
                if len(input_shape) == 3 and input_shape[0] == 3
                else ""
            )
            raise ConfigError(
                f"image key {key!r}: shape {tuple(input_shape)} is not (H, W, 3) RGB{hint}"
            )
        self.input_shape = tuple(int(s) for s in input_shape)
        self.resize_shape = (
            None if resize_shape is None else (int(resize_shape[0]), int(resize_shape[1]))
        )
        ch, cw = int(crop_shape[0]), int(crop_shape[1])
        src = self.resize_shape or self.input_shape[:2]
        if not (1 <= ch <= src[0] and 1 <= cw <= src[1]):
            raise ConfigError(
                f"policy.encoder.crop_shape={[ch, cw]} must fit inside the "
                f"{'resize_shape' if self.resize_shape else 'image'} {list(src)} of key {key!r}"
            )
        self.crop = CropRandomizer((ch, cw))
        # channels-last (NHWC) weights and inputs: a batch-64 CPU training step of the CPU image preset
        # took 176 ms against 198 ms contiguous (2 threads, docs/BENCHMARKS.md "Image policy");
        # cuDNN also prefers NHWC. The arithmetic is the same; state dicts are saved contiguous.
        self.backbone = ResNet18Trunk(width).to(memory_format=torch.channels_last)
        self.pool = SpatialSoftmax(self.backbone.out_channels, num_keypoints)
        self.proj = nn.Linear(self.pool.output_dim, feature_dim)
        self.output_dim = feature_dim

    def check_input(self, x: torch.Tensor) -> None:
        """(B, To, H, W, 3) uint8 at the trained resolution (any resolution when resizing)."""
        to = x.shape[1] if x.ndim == 5 else "To"
        check_image_obs(self.key, x, (to, *self.input_shape), self.resize_shape is not None)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, h, w) float in [-1, 1] (x / 255 * 2 - 1), resized and cropped."""
        if self.resize_shape is not None and tuple(x.shape[1:3]) != self.resize_shape:
            img = x.permute(0, 3, 1, 2).float()
            img = F.interpolate(
                img, self.resize_shape, mode="bilinear", antialias=True, align_corners=False
            )
            return to_unit_range(self.crop(img.permute(0, 2, 3, 1)))  # crop an HWC view
        return to_unit_range(self.crop(x))  # crop the uint8 frames: 4x fewer bytes than float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        b, to = x.shape[:2]
        img = self.preprocess(x.flatten(0, 1))  # (B*To, 3, h, w)
        feat = self.pool(self.backbone(img))  # (B*To, 2K)
        return torch.relu(self.proj(feat)).unflatten(0, (b, to))  # (B, To, F)
