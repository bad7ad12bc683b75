"""The fast DDIM paths (diffusion_policy/sampling.py) against the reference diffusers loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_policy.config import load_config
from diffusion_policy.errors import ConfigError
from diffusion_policy.models.packed_unet import PackedUnet
from diffusion_policy.models.unet1d import ConditionalUnet1D
from diffusion_policy.policies.diffusion import make_scheduler
from diffusion_policy.policies.diffusion_sampling import ddim_step, ddim_table
from diffusion_policy.registry import policy_class
from diffusion_policy.shapes import ObsSpec, ShapeMeta

STATE = ShapeMeta(obs={"keypoints": ObsSpec((20,), "float32", "low_dim")}, action_dim=2)
IMAGE = ShapeMeta(
    obs={
        "pixels": ObsSpec((96, 96, 3), "uint8", "rgb"),
        "agent_pos": ObsSpec((2,), "float32", "low_dim"),
    },
    action_dim=2,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _policy(shape_meta: ShapeMeta, overrides=(), seed: int = 0):
    extra = ["task.obs_type=pixels_agent_pos", "policy.encoder.resnet_width=16"]
    cfg = load_config("smoke", [*(extra if shape_meta is IMAGE else []), *overrides])
    torch.manual_seed(seed)
    policy = policy_class("diffusion")(cfg.policy, shape_meta)
    for p in policy.model.parameters():  # trained-looking weights: the init zeroes nothing here,
        p.data.add_(torch.randn_like(p) * 0.05)  # but make every path carry signal
    rng = np.random.default_rng(seed)
    low = {k: rng.uniform(0, 512, (200, s.shape[0])) for k, s in shape_meta.obs.items() if s.kind == "low_dim"}  # fmt: skip
    policy.fit_normalizer({**low, "action": rng.uniform(0, 512, (200, 2))})
    return policy.eval()


def _obs(shape_meta: ShapeMeta, b: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shape_meta.obs.items():
        if s.kind == "rgb":
            out[k] = torch.randint(0, 256, (b, 2, *s.shape), dtype=torch.uint8, generator=g)
        else:
            out[k] = torch.rand(b, 2, *s.shape, generator=g) * 512
    return out


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_ddim_table_reproduces_diffusers_step(spacing, prediction_type, k):
    from diffusion_policy.policies.diffusion import NoiseConfig

    noise = NoiseConfig(prediction_type=prediction_type, timestep_spacing=spacing)
    sched = make_scheduler(noise, "ddim")
    table = ddim_table(sched, k)
    sched.set_timesteps(k)
    assert table.timesteps.tolist() == sched.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 2, generator=g)
    for i, t in enumerate(sched.timesteps):
        out = torch.randn(3, 16, 2, generator=g)
        ref = sched.step(out, t, x).prev_sample
        ours = ddim_step(
            x, out, table.sqrt_a[i], table.sqrt_1ma[i], table.sqrt_a_prev[i],
            table.sqrt_1ma_prev[i], table.clip, table.prediction_type,
        )  # fmt: skip
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        x = ref


def test_trailing_spacing_starts_at_the_last_timestep():
    from diffusion_policy.policies.diffusion import NoiseConfig

    lead = ddim_table(make_scheduler(NoiseConfig(), "ddim"), 10).timesteps
    trail = ddim_table(make_scheduler(NoiseConfig(timestep_spacing="trailing"), "ddim"), 10).timesteps  # fmt: skip
    assert lead[0] == 90 and trail[0] == 99 and trail[-1] == 9


@pytest.mark.parametrize("scale", [True, False])
def test_film_table_and_packed_unet_match_forward(scale):
    torch.manual_seed(0)
    unet = ConditionalUnet1D(2, 40, 32, [16, 32, 64], cond_predict_scale=scale).eval()
    for p in unet.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    x, cond, t = torch.randn(3, 16, 2), torch.randn(3, 40), torch.tensor([7, 7, 7])
    with torch.no_grad():
        ref = unet(x, t, cond)
        films = [f[0] for f in unet.film_table(torch.tensor([7]), cond)]
        torch.testing.assert_close(unet.forward_film(x, films), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(PackedUnet(unet).forward_film(x, films), ref, rtol=1e-4, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("backend", ["fused", "cpu", "auto"])
@pytest.mark.parametrize("meta", [STATE, IMAGE], ids=["state", "image"])
def test_fast_backends_match_the_reference_loop(backend, meta):
    policy = _policy(meta)
    policy.set_sampler("ddim", 4, "trailing")
    for b in (1, 3):  # each batch size builds its own traced runner
        obs, noise = _obs(meta, b), torch.randn(b, 16, 2)
        policy.set_inference_backend("eager")
        ref = policy.predict_action_chunk(obs, noise=noise)
        policy.set_inference_backend(backend)
        out = policy.predict_action_chunk(obs, noise=noise)
        # actions are in pixels (0..512): 1e-3 px is float rounding, not a different sample
        torch.testing.assert_close(out["action_pred"], ref["action_pred"], rtol=0, atol=1e-3)
        torch.testing.assert_close(out["action"], ref["action"], rtol=0, atol=1e-3)


def test_generator_draws_the_same_noise_on_both_paths():
    policy = _policy(STATE)
    policy.set_sampler("ddim", 3)
    obs = _obs(STATE, 2)
    outs = []
    for backend in ("eager", "cpu"):
        policy.set_inference_backend(backend)
        outs.append(policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(outs[0]["action"], outs[1]["action"], rtol=0, atol=1e-3)


def test_cpu_trace_serves_small_batches_and_large_ones_run_the_reference_loop(monkeypatch):
    """The traced CPU kernel's buffers grow with the batch (6 GB at BID's 800 rows): above
    CPU_TRACE_MAX_BATCH a chunk runs the reference loop, with the same result."""
    import diffusion_policy.policies.diffusion as diffusion
    from diffusion_policy.policies.diffusion_sampling import CPU_TRACE_MAX_BATCH

    policy = _policy(STATE)
    policy.set_sampler("ddim", 2)
    policy.set_inference_backend("cpu")
    built: list[int] = []
    real = diffusion.FastSampler

    def counting(*a, **k):
        built.append(1)
        return real(*a, **k)

    monkeypatch.setattr(diffusion, "FastSampler", counting)
    big = CPU_TRACE_MAX_BATCH + 1
    obs, noise = _obs(STATE, big), torch.randn(big, 16, 2)
    out = policy.predict_action_chunk(obs, noise=noise)["action_pred"]
    assert built == []  # the large batch never reached the traced kernel
    policy.predict_action_chunk(_obs(STATE, 2), noise=torch.randn(2, 16, 2))
    assert built == [1]  # a small one does
    policy.set_inference_backend("eager")
    ref = policy.predict_action_chunk(obs, noise=noise)["action_pred"]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_cpu_backend_repacks_after_weights_change_in_place():
    policy = _policy(STATE)
    policy.set_sampler("ddim", 2)
    policy.set_inference_backend("cpu")
    obs, noise = _obs(STATE, 1), torch.randn(1, 16, 2)
    before = policy.predict_action_chunk(obs, noise=noise)["action_pred"]
    with torch.no_grad():
        for p in policy.model.parameters():
            p.mul_(1.1)  # what an optimizer or EMA step does: in place
    after = policy.predict_action_chunk(obs, noise=noise)["action_pred"]
    policy.set_inference_backend("eager")
    ref = policy.predict_action_chunk(obs, noise=noise)["action_pred"]
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, ref, rtol=0, atol=1e-3)


def test_ddpm_ignores_the_fast_backend_and_step_count_changes_apply():
    policy = _policy(STATE)
    policy.set_inference_backend("cpu")
    policy.set_sampler("ddpm", 3)
    obs = _obs(STATE, 1)
    a = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
    policy.set_inference_backend("eager")
    b = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a["action"], b["action"])  # DDPM: the reference path, bit for bit
    policy.set_inference_backend("cpu")
    policy.set_sampler("ddim", 2)
    c2 = policy.predict_action_chunk(obs, noise=torch.zeros(1, 16, 2))
    policy.set_sampler("ddim", 5)
    c5 = policy.predict_action_chunk(obs, noise=torch.zeros(1, 16, 2))
    assert not torch.allclose(c2["action_pred"], c5["action_pred"])


def test_bad_backend_and_spacing_are_config_errors():
    policy = _policy(STATE)
    with pytest.raises(ConfigError, match="inference backend 'warp'"):
        policy.set_inference_backend("warp")
    with pytest.raises(ConfigError, match="cuda_graph needs the policy on a CUDA device"):
        policy.set_inference_backend("cuda_graph")
    with pytest.raises(ConfigError, match="timestep_spacing='sideways'"):
        policy.set_sampler("ddim", 4, "sideways")
    with pytest.raises(ConfigError, match="timestep_spacing"):
        load_config("smoke", ["policy.noise.timestep_spacing=sideways"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("meta", [STATE, IMAGE], ids=["state", "image"])
def test_cuda_graph_backend_matches_the_reference_loop(meta):
    policy = _policy(meta).cuda()
    policy.set_sampler("ddim", 4, "trailing")
    for b in (1, 3):
        obs = {k: v.cuda() for k, v in _obs(meta, b).items()}
        noise = torch.randn(b, 16, 2, device="cuda")
        policy.set_inference_backend("eager")
        ref = policy.predict_action_chunk(obs, noise=noise)
        policy.set_inference_backend("cuda_graph")
        for _ in range(2):  # capture, then replay
            out = policy.predict_action_chunk(obs, noise=noise)
            torch.testing.assert_close(out["action_pred"], ref["action_pred"], rtol=0, atol=2e-2)


def test_packed_unet_rejects_a_transposed_conv_it_cannot_express():
    unet = ConditionalUnet1D(2, 8, 16, [16, 32])
    unet.up_modules[0][2] = nn.ConvTranspose1d(16, 16, 3, 2, 1)
    with pytest.raises(ValueError, match="k=4, s=2, p=1"):
        PackedUnet(unet)
