"""UNet sizes and shapes, and the EMA schedule."""

from __future__ import annotations

import pytest
import torch

from diffusion_policy.models.ema import EMAModel
from diffusion_policy.models.unet1d import ConditionalUnet1D


def _count(**kw) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in ConditionalUnet1D(**kw).parameters())


def test_paper_parameter_counts():
    # spec §3.1: state DP-CNN 65,783,298; image DP-CNN (hybrid) 251,511,938
    assert (
        _count(
            input_dim=2,
            global_cond_dim=40,
            diffusion_step_embed_dim=256,
            down_dims=[256, 512, 1024],
            kernel_size=5,
        )
        == 65_783_298
    )
    assert (
        _count(
            input_dim=2,
            global_cond_dim=132,
            diffusion_step_embed_dim=128,
            down_dims=[512, 1024, 2048],
            kernel_size=5,
        )
        == 251_511_938
    )


@pytest.mark.parametrize("scale", [True, False])
def test_unet_shapes_and_timestep_forms(scale):
    m = ConditionalUnet1D(3, 10, 16, [8, 16, 32], kernel_size=3, cond_predict_scale=scale)
    x, c = torch.randn(4, 16, 3), torch.randn(4, 10)
    out = m(x, torch.tensor([0, 5, 50, 99]), c)
    assert out.shape == x.shape
    assert torch.equal(m(x, 7, c), m(x, torch.tensor(7), c))
    assert torch.equal(m(x, 7, c), m(x, torch.full((4,), 7), c))


def test_conditioning_changes_the_output():
    torch.manual_seed(0)
    m = ConditionalUnet1D(2, 4, 16, [8, 16])
    x = torch.randn(2, 8, 2)
    a = m(x, 3, torch.zeros(2, 4))
    b = m(x, 3, torch.ones(2, 4))
    assert not torch.allclose(a, b)


def test_ema_power_schedule_and_update():
    lin = torch.nn.Linear(2, 2)
    ema = EMAModel(lin, power=0.75, max_decay=0.9999)
    assert ema.get_decay(0) == 0.0 and ema.get_decay(1) == 0.0
    assert ema.get_decay(2) == pytest.approx(1 - 2**-0.75)
    assert ema.get_decay(10_001) == pytest.approx(0.999, abs=2e-5)  # ~1e4 steps -> 0.999
    assert ema.get_decay(10**7) == 0.9999
    ema.step(lin)  # decay 0: copies
    assert torch.equal(ema.model.weight, lin.weight)
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.optimization_step = 2
    old = ema.model.weight.clone()
    ema.step(lin)
    d = 1 - 2**-0.75
    torch.testing.assert_close(ema.model.weight, d * old + (1 - d) * lin.weight)
    assert not ema.model.weight.requires_grad
