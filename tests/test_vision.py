"""The paper's vision encoder (spec §3.2) and the image policy: shapes, parameter counts, GroupNorm,
crops, bf16 autocast, bad input, determinism, save/load, and a train -> eval smoke run on real data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_policy.checkpoint import load_policy, save_checkpoint
from diffusion_policy.config import Config, load_config
from diffusion_policy.errors import ConfigError, ObservationError
from diffusion_policy.models.encoders import EncoderConfig, build_image_encoder
from diffusion_policy.models.vision import (
    CropRandomizer,
    ImageEncoder,
    ResNet18Trunk,
    SpatialSoftmax,
    crop_images,
)
from diffusion_policy.registry import policy_class
from diffusion_policy.shapes import ObsSpec, ShapeMeta

SHAPE_META = ShapeMeta(
    obs={
        "pixels": ObsSpec((96, 96, 3), "uint8", "rgb"),
        "agent_pos": ObsSpec((2,), "float32", "low_dim"),
    },
    action_dim=2,
)
TINY = [  # a small image policy for fast tests: 16-wide ResNet, tiny UNet, 4 DDIM steps
    "task.obs_type=pixels_agent_pos",
    "policy.encoder.resnet_width=16",
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread for these conv-heavy tests: on a shared 2-core machine with other jobs
    running, 2 OpenMP threads made a tiny Conv1d take 39-90 ms instead of 0.3-0.4 ms (threads
    spin-wait for a descheduled peer; docs/BENCHMARKS.md "Image policy"), and this module took
    minutes instead of about 25 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny_policy(overrides: tuple[str, ...] = (), seed: int = 0):
    cfg = load_config("smoke", [*TINY, *overrides])
    torch.manual_seed(seed)
    policy = policy_class(cfg.policy.name)(cfg.policy, SHAPE_META)
    rng = np.random.default_rng(seed)
    policy.fit_normalizer(
        {"agent_pos": rng.uniform(0, 512, (200, 2)), "action": rng.uniform(0, 512, (200, 2))}
    )
    return policy, cfg


def image_batch(b: int = 2, to: int = 2, seed: int = 0, horizon: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": {
            "pixels": torch.randint(0, 256, (b, to, 96, 96, 3), dtype=torch.uint8, generator=g),
            "agent_pos": torch.rand(b, to, 2, generator=g) * 512,
        },
        "action": torch.rand(b, horizon, 2, generator=g) * 512,
    }


def coordinate_images(n: int, h: int = 96, w: int = 96) -> torch.Tensor:
    """(n, h, w, 3) uint8 whose pixel (i, j) of image k holds (i, j, k): a crop reveals its offset."""
    i = torch.arange(h)[:, None].expand(h, w)
    j = torch.arange(w)[None, :].expand(h, w)
    img = torch.stack([i, j, torch.zeros_like(i)], dim=-1)[None].repeat(n, 1, 1, 1)
    img[..., 2] = torch.arange(n)[:, None, None]
    return img.to(torch.uint8)


# --- the encoder ---------------------------------------------------------------------------------


def test_paper_encoder_shapes_and_parameter_count():
    enc = build_image_encoder(EncoderConfig(), (96, 96, 3), key="pixels")
    # spec §3.2: trunk 11,176,512 + SpatialSoftmax conv 16,416 + Linear 4,160 = 11,197,088
    assert n_params(enc.backbone) == 11_176_512
    assert n_params(enc.pool) == 512 * 32 + 32
    assert n_params(enc.proj) == 64 * 64 + 64
    assert n_params(enc) == 11_197_088
    assert enc.output_dim == 64
    x = torch.randint(0, 256, (2, 3, 96, 96, 3), dtype=torch.uint8)
    enc.eval()
    with torch.no_grad():
        fmap = enc.backbone(enc.preprocess(x[:, 0]))
        y = enc(x)
    assert fmap.shape == (2, 512, 3, 3)  # 84x84 crops give a 3x3 map
    assert y.shape == (2, 3, 64) and (y >= 0).all()  # ReLU features


def test_group_norm_everywhere_and_no_batch_norm():
    for width in (16, 64):
        trunk = ResNet18Trunk(width)
        norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        assert norms == [], "a BatchNorm is left"
        gns = [m for m in trunk.modules() if isinstance(m, nn.GroupNorm)]
        assert len(gns) == 20  # bn1 + 2 per BasicBlock (8) + 3 downsample norms
        assert all(m.num_groups == m.num_channels // 16 for m in gns)
    with pytest.raises(ConfigError, match="multiple of 16"):
        ResNet18Trunk(24)


def test_resnet_keeps_torchvision_names():
    """Names and shapes of torchvision's resnet18 (fc dropped); compared with torchvision when present."""
    ours = {k: tuple(v.shape) for k, v in ResNet18Trunk(64).named_parameters()}
    assert len(ours) == 60
    assert ours["conv1.weight"] == (64, 3, 7, 7) and ours["bn1.weight"] == (64,)
    assert ours["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert ours["layer4.1.bn2.bias"] == (512,)
    assert "layer1.0.downsample.0.weight" not in ours  # stride 1, same width: identity residual
    try:
        import torchvision
    except Exception as e:  # not installable beside the CPU torch build used here
        pytest.skip(f"torchvision is not importable ({type(e).__name__}: {e})")
    tv = torchvision.models.resnet18(weights=None)
    theirs = {k: tuple(v.shape) for k, v in tv.named_parameters() if not k.startswith("fc.")}
    assert ours == theirs
    assert n_params(tv) - n_params(tv.fc) == n_params(ResNet18Trunk(64))


def test_spatial_softmax_finds_the_peak():
    """A one-hot peak at (row r, col c) gives keypoint (x, y) = (grid[c], grid[r])."""
    ss = SpatialSoftmax(2, num_keypoints=2)
    with torch.no_grad():
        ss.keypoints.weight.copy_(torch.eye(2)[:, :, None, None] * 100.0)
        ss.keypoints.bias.zero_()
    fmap = torch.zeros(1, 2, 3, 5)
    fmap[0, 0, 2, 1] = 1.0  # keypoint 0: row 2 (y = 1), col 1 (x = -0.5)
    fmap[0, 1, 0, 4] = 1.0  # keypoint 1: row 0 (y = -1), col 4 (x = 1)
    out = ss(fmap)
    torch.testing.assert_close(out, torch.tensor([[-0.5, 1.0, 1.0, -1.0]]), atol=1e-6, rtol=0)
    # temperature 1 on a flat map: the mean of the grid, i.e. the center
    torch.testing.assert_close(ss(torch.zeros(1, 2, 3, 5)), torch.zeros(1, 4))


def test_input_scaled_to_minus_one_one():
    enc = ImageEncoder((96, 96, 3), crop_shape=(84, 84), width=16).eval()
    x = torch.zeros(2, 96, 96, 3, dtype=torch.uint8)
    x[1] = 255
    img = enc.preprocess(x)
    assert img.shape == (2, 3, 84, 84) and img.dtype == torch.float32
    assert (img[0] == -1).all() and (img[1] == 1).all()


# --- crops ---------------------------------------------------------------------------------------


def test_crop_images_matches_slicing():
    x = coordinate_images(5)
    offsets = torch.tensor([[0, 0], [11, 11], [3, 7], [6, 6], [12, 0]])
    out = crop_images(x, offsets, (84, 84))
    assert out.shape == (5, 3, 84, 84)  # channels first
    for k, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(out[k], x[k, r : r + 84, c : c + 84].permute(2, 0, 1))


def _offsets(crops: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) crops of coordinate_images -> their (row, col) offsets (N, 2)."""
    return crops[:, :2, 0, 0].long()


def test_random_crops_in_train_center_crop_in_eval():
    crop = CropRandomizer((84, 84))
    x = coordinate_images(64)
    crop.train()
    a, b = crop(x), crop(x)
    for out in (a, b):
        off = _offsets(out)
        assert off.min() >= 0 and off.max() <= 11  # robomimic's range [0, 96 - 84)
        for k, (r, c) in enumerate(off.tolist()):  # every crop is a true crop of its own image
            assert torch.equal(out[k], x[k, r : r + 84, c : c + 84].permute(2, 0, 1))
    assert len({tuple(o) for o in _offsets(a).tolist()}) > 10  # samples differ
    assert not torch.equal(_offsets(a), _offsets(b))  # calls differ
    crop.eval()
    assert torch.equal(crop(x), x[:, 6:90, 6:90].permute(0, 3, 1, 2))


def test_encoder_crops_each_sample_and_step_independently():
    enc = ImageEncoder((96, 96, 3), crop_shape=(84, 84), width=16)
    frames = coordinate_images(1).expand(8, 2, 96, 96, 3)  # one image at every (B, To)
    enc.train()
    seen = []
    enc.crop.register_forward_hook(lambda m, i, o: seen.append(_offsets(o)))
    y_train = enc(frames)
    assert len({tuple(o) for o in seen[-1].tolist()}) > 4  # (B * To) identical frames, cut apart
    enc.eval()
    with torch.no_grad():
        e1, e2 = enc(frames), enc(frames)
    assert torch.equal(seen[-1], torch.full((16, 2), 6))  # the center crop in eval
    assert torch.equal(e1, e2) and torch.equal(e1[0, 0], e1[5, 1])
    assert not torch.allclose(y_train[:, 0], y_train[:, 1])


def test_resize_option_accepts_other_resolutions():
    enc = ImageEncoder((96, 96, 3), crop_shape=(56, 56), width=16, resize_shape=(64, 64)).eval()
    assert enc.preprocess(torch.zeros(3, 128, 100, 3, dtype=torch.uint8)).shape == (3, 3, 56, 56)
    y = enc(torch.zeros(2, 2, 128, 128, 3, dtype=torch.uint8))
    assert y.shape == (2, 2, 64)
    with pytest.raises(ConfigError, match="must fit inside"):
        EncoderConfig(crop_shape=[84, 84], resize_shape=[64, 64])
    with pytest.raises(ConfigError, match="not \\(H, W, 3\\) RGB \\(channels-first"):
        ImageEncoder((3, 96, 96))


def test_bad_image_input_names_key_shape_and_dtype():
    policy, _ = tiny_policy()
    policy.eval()
    obs = image_batch(b=2)["obs"]
    with pytest.raises(ObservationError, match=r"missing key\(s\) \['pixels'\]"):
        policy.predict_action_chunk({"agent_pos": obs["agent_pos"]})
    chw = obs["pixels"].permute(0, 1, 4, 2, 3)
    with pytest.raises(
        ObservationError,
        match=r"obs\['pixels'\] has shape \(2, 2, 3, 96, 96\) and dtype torch.uint8, expected \(B, 2, 96, 96, 3\) uint8 HWC RGB: these look channels-first",
    ):
        policy.predict_action_chunk({**obs, "pixels": chw})
    with pytest.raises(ObservationError, match=r"dtype torch.float32, expected .* uint8 HWC"):
        policy.predict_action_chunk({**obs, "pixels": obs["pixels"].float() / 255})
    big = torch.zeros(2, 2, 128, 128, 3, dtype=torch.uint8)
    with pytest.raises(ObservationError, match=r"trained on 96x96 images.*resize_shape"):
        policy.predict_action_chunk({**obs, "pixels": big})
    with pytest.raises(ObservationError, match=r"obs\['pixels'\] has shape \(2, 1, 96, 96, 3\)"):
        policy.predict_action_chunk({**obs, "pixels": obs["pixels"][:, :1]})
    # numpy HWC uint8 frames, as the env gives them, are accepted
    np_obs = {k: v.numpy() for k, v in obs.items()}
    assert policy.predict_action_chunk(np_obs)["action"].shape == (2, 8, 2)
    # the encoder checks its input too (the training path does not go through check_obs)
    with pytest.raises(ObservationError, match=r"obs\['pixels'\] .* 96x96"):
        policy.obs_encoder.image_encoders["pixels"](big)


def test_policy_with_resize_shape_serves_other_resolutions():
    policy, _ = tiny_policy(
        ("policy.encoder.resize_shape=[64,64]", "policy.encoder.crop_shape=[56,56]")
    )
    policy.eval()
    obs = {**image_batch(b=1)["obs"], "pixels": torch.zeros(1, 2, 120, 120, 3, dtype=torch.uint8)}
    assert policy.predict_action_chunk(obs)["action"].shape == (1, 8, 2)


# --- presets -------------------------------------------------------------------------------------


def _count_on_meta(preset: str) -> tuple[int, int]:
    cfg = load_config(preset)
    with torch.device("meta"):  # no memory, no init: 251 M parameters in a fraction of a second
        policy = policy_class(cfg.policy.name)(cfg.policy, SHAPE_META)
    return n_params(policy.model), n_params(policy.obs_encoder)


def test_paper_image_preset_sizes():
    cfg = load_config("pusht_diffusion_image")
    assert cfg.task.obs_type == "pixels_agent_pos" and cfg.train.batch_size == 64
    assert cfg.train.num_epochs == 3050 and cfg.policy.encoder.crop_shape == [84, 84]
    unet, enc = _count_on_meta("pusht_diffusion_image")
    assert unet == 251_511_938  # spec §3.1 table, global cond 66 x 2 = 132
    assert math.isclose(enc, 11.2e6, rel_tol=0.01)


def test_cpu_image_preset_is_small():
    unet, enc = _count_on_meta("pusht_diffusion_image_cpu")
    assert math.isclose(unet, 4.56e6, rel_tol=0.01) and math.isclose(enc, 0.71e6, rel_tol=0.01)


# --- policy: bf16, determinism, save/load --------------------------------------------------------


def test_bf16_autocast_matches_fp32_on_cpu():
    """bf16 keeps 8 mantissa bits (unit roundoff u = 2^-8 ~ 0.004). Rounding at each of the ~20
    conv/norm layers adds up like a random walk, ~u * sqrt(20) ~ 0.02 relative on the features
    (measured 0.009-0.012 over 6 seeds and widths 16/64); the loss averages many errors out
    (measured <= 0.08 % relative). Tolerances: 4 % on features, 1 % on the loss."""
    policy, _ = tiny_policy(seed=1)
    policy.eval()  # center crops: the only difference is the arithmetic
    batch = image_batch(b=8, seed=1)
    batch.update(policy.sample_training_noise(8, torch.Generator().manual_seed(1)))
    enc = policy.obs_encoder.image_encoders["pixels"]
    with torch.no_grad():
        f32, l32 = enc(batch["obs"]["pixels"]), policy.compute_loss(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f16, l16 = enc(batch["obs"]["pixels"]), policy.compute_loss(batch)
    assert f16.dtype == torch.bfloat16  # autocast really ran in bf16
    rel = float((f16.float() - f32).norm() / f32.norm())
    assert 0 < rel < 0.04, rel
    assert abs(float(l16) - float(l32)) < 0.01 * float(l32)


def test_sampling_is_deterministic_and_survives_save_load(tmp_path):
    policy, cfg = tiny_policy()
    policy.eval()
    obs = image_batch(b=2, seed=3)["obs"]
    a = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(7))["action"]
    b = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(7))["action"]
    c = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(8))["action"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    save_checkpoint(
        tmp_path / "ckpt",
        Config(preset="test", policy=cfg.policy, task=cfg.task),
        SHAPE_META,
        policy,
    )
    loaded, cfg2, _ = load_policy(tmp_path / "ckpt")
    assert cfg2.policy.encoder == cfg.policy.encoder
    d = loaded.predict_action_chunk(obs, generator=torch.Generator().manual_seed(7))["action"]
    assert torch.equal(a, d)


# --- train -> eval on the real store -------------------------------------------------------------


@pytest.mark.real_data
def test_image_smoke_train_then_eval(pusht_zarr, tmp_path, capsys):
    from diffusion_policy.cli.main import main

    run = tmp_path / "run"
    rc = main(
        [
            "train", "smoke", *TINY, f"task.dataset={pusht_zarr}", f"run_dir={run}",
            "train.device=cpu", "eval.n_videos=0", "train.val_every=4",
            "train.amp=true",  # bf16 autocast of the training forward (CPU autocast here)
            # 48x48 frames: 4x cheaper, and `dp eval` then resizes the env's 96x96 frames
            "policy.encoder.resize_shape=[48,48]", "policy.encoder.crop_shape=[40,40]",
        ]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    ckpt = run / "checkpoints" / "latest"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["shape_meta"]["obs"]["pixels"] == {
        "shape": [96, 96, 3],
        "dtype": "uint8",
        "kind": "rgb",
    }
    assert meta["step"] == 4
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scores = [e["eval/mean_score"] for e in events if "eval/mean_score" in e]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)  # evaluated during training too
    out = tmp_path / "eval"
    rc = main(["eval", str(run), "--episodes", "2", "--sync", "--videos", "0", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_episodes"] == 2 and sorted(metrics["per_seed"]) == ["100000", "100001"]
    assert all(0.0 <= r["max_reward"] <= 1.0 for r in metrics["per_seed"].values())
