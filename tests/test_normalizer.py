"""LinearNormalizer: round trips, constant dims, strict keys, state_dict round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_policy.models.normalizer import LinearNormalizer, NormalizerError


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 5.0, (200, 3)).astype(np.float32)
    x[:, 2] = 7.0  # a constant dimension
    return {"obs": x, "action": rng.uniform(-2, 9, (200, 2)).astype(np.float32)}


@pytest.mark.parametrize("mode", ["limits", "gaussian"])
def test_round_trip(mode):
    d = data()
    n = LinearNormalizer({"obs": 3, "action": 2}).fit(d, mode=mode)
    for k, v in d.items():
        x = torch.from_numpy(v)
        y = n.normalize(k, x)
        torch.testing.assert_close(n.unnormalize(k, y), x, rtol=1e-5, atol=1e-4)
    y = n.normalize("action", torch.from_numpy(d["action"]))
    if mode == "limits":
        torch.testing.assert_close(y.min(0).values, torch.tensor([-1.0, -1.0]))
        torch.testing.assert_close(y.max(0).values, torch.tensor([1.0, 1.0]))
    else:
        torch.testing.assert_close(y.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["limits", "gaussian"])
def test_constant_dim_maps_to_zero(mode):
    d = data()
    n = LinearNormalizer({"obs": 3}).fit({"obs": d["obs"]}, mode=mode)
    y = n.normalize("obs", torch.from_numpy(d["obs"]))
    assert torch.all(y[:, 2] == 0)
    assert n.stats("obs")["min"][2] == 7.0


def test_leading_dims_and_shapes():
    n = LinearNormalizer({"action": 2}).fit({"action": data()["action"]})
    x = torch.rand(4, 16, 2)
    assert n.normalize("action", x).shape == (4, 16, 2)


def test_missing_and_unknown_keys_raise():
    n = LinearNormalizer({"obs": 3, "action": 2}).fit({"action": data()["action"]})
    with pytest.raises(NormalizerError, match="never fitted"):
        n.normalize("obs", torch.zeros(3))
    with pytest.raises(NormalizerError, match="no key 'image'"):
        n.normalize("image", torch.zeros(3))
    with pytest.raises(NormalizerError, match="not declared"):
        n.fit({"pixels": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="non-finite"):
        n.fit({"obs": np.full((2, 3), np.nan)})
    assert n.is_fitted("action") and not n.is_fitted("obs") and not n.is_fitted("nope")


def test_state_dict_round_trip():
    d = data()
    a = LinearNormalizer({"obs": 3, "action": 2}).fit(d)
    b = LinearNormalizer({"obs": 3, "action": 2})
    b.load_state_dict(a.state_dict())
    x = torch.from_numpy(d["obs"])
    torch.testing.assert_close(b.normalize("obs", x), a.normalize("obs", x))
    assert b.is_fitted("obs")


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.nan, r"'action': min\[1\] = nan is non-finite"),
        (2.45e35, r"'action': max\[1\] = 2.45e\+35 is non-finite or beyond ±1e\+06"),
        (-3e7, r"'action': min\[1\] = -3e\+07"),
    ],
)
def test_absurd_statistics_are_refused_naming_the_key(bad, match):
    """Issue 17 item 3: a corrupt value must not become the normaliser's scale (NaN actions later)."""
    from diffusion_policy.errors import DataError

    d = data()["action"].astype(np.float64)
    d[17, 1] = bad
    n = LinearNormalizer({"action": 2})
    with pytest.raises(DataError, match=match):
        n.fit({"action": d})
    assert not n.is_fitted("action")
