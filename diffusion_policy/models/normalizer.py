"""Per-key, per-dimension affine normalisation that lives in the policy's state dict.

Statistics are fitted once from the dataset and saved with the weights, so a checkpoint can never be
evaluated with another dataset's scaling. Every lookup is strict: a key that was not declared, or a
key that was declared but never fitted, raises instead of passing raw values through. Fitting refuses
statistics no real data has (non-finite, or beyond MAX_ABS): they come from corrupt data, and a policy
trained on them outputs garbage or NaN with normal-looking losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn

from diffusion_policy.errors import DataError

MAX_ABS = 1e6  # statistics beyond this are refused: the data layer's plausible-magnitude bound
Mode = Literal["limits", "gaussian", "identity"]


class NormalizerError(KeyError):
    """A key is unknown to the normaliser or was never fitted."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _check_stats(key: str, stats: Mapping[str, torch.Tensor]) -> None:
    """One line naming the key and the first statistic that is non-finite or beyond MAX_ABS."""
    for name, v in stats.items():
        bad = ~(v.abs() <= MAX_ABS)  # True for NaN and Inf too
        if bad.any():
            d = int(torch.nonzero(bad)[0, 0])
            raise DataError(
                f"cannot fit normaliser key {key!r}: {name}[{d}] = {float(v[d]):.3g} is non-finite or "
                f"beyond ±{MAX_ABS:.0e}: the training data is corrupt (check it with `dp data validate`)"
            )


class LinearNormalizer(nn.Module):
    """y = x * scale + offset per key and dimension (the last axis); inverse x = (y - offset) / scale.

    `limits` maps [min, max] to [-1, 1]; `gaussian` maps to zero mean and unit std; `identity` passes
    values through (scale 1, offset 0) but still records the statistics, for keys a task declares
    already normalised. A dimension whose range (or std) is below `eps` gets scale 1 and maps to 0 at
    its constant value.
    """

    def __init__(self, dims: Mapping[str, int]):
        super().__init__()
        self.dims = dict(dims)
        for key, d in self.dims.items():
            for stat, fill in (
                ("scale", 1.0),
                ("offset", 0.0),
                ("min", 0.0),
                ("max", 0.0),
                ("mean", 0.0),
                ("std", 1.0),
            ):
                self.register_buffer(self._name(key, stat), torch.full((d,), fill))
            self.register_buffer(self._name(key, "fitted"), torch.zeros((), dtype=torch.bool))
        # keys known to be fitted: reading the flag on a GPU is a host sync (and illegal inside a
        # CUDA graph), so each key's flag is read once and remembered
        self._fitted_keys: set[str] = set()

    def _load_from_state_dict(self, *args, **kwargs):
        self._fitted_keys = set()  # new statistics: read the flags again
        return super()._load_from_state_dict(*args, **kwargs)

    @staticmethod
    def _name(key: str, stat: str) -> str:
        return f"{key.replace('.', '__')}__{stat}"

    def _get(self, key: str, stat: str) -> torch.Tensor:
        if key not in self.dims:
            raise NormalizerError(f"normaliser has no key {key!r} (known: {sorted(self.dims)})")
        if not self.is_fitted(key):
            raise NormalizerError(f"normaliser key {key!r} was never fitted")
        return getattr(self, self._name(key, stat))

    def fit(
        self,
        data: Mapping[str, np.ndarray | torch.Tensor],
        mode: Mode | Mapping[str, Mode] = "limits",
        output_range: tuple[float, float] = (-1.0, 1.0),
        eps: float = 1e-4,
    ) -> LinearNormalizer:
        """Fit every key in `data` (arrays of shape (..., D)); keys must have been declared. `mode` is
        one mode for all keys or a mapping key -> mode (keys it does not name use `limits`)."""
        lo_out, hi_out = output_range
        for key, value in data.items():
            key_mode = mode if isinstance(mode, str) else mode.get(key, "limits")
            if key not in self.dims:
                raise NormalizerError(
                    f"cannot fit {key!r}: not declared (known: {sorted(self.dims)})"
                )
            x = (
                value.detach().cpu()
                if isinstance(value, torch.Tensor)
                else torch.from_numpy(np.asarray(value))
            )
            x = x.to(torch.float64).reshape(-1, self.dims[key])
            if x.shape[0] == 0:
                raise DataError(f"cannot fit normaliser key {key!r}: no data")
            xmin, xmax = x.min(0).values, x.max(0).values
            mean, std = x.mean(0), x.std(0, unbiased=False)
            _check_stats(key, {"min": xmin, "max": xmax, "mean": mean, "std": std})
            if key_mode == "identity":
                scale, offset = torch.ones_like(xmin), torch.zeros_like(xmin)
            elif key_mode == "limits":
                rng = xmax - xmin
                const = rng < eps
                scale = torch.where(
                    const,
                    torch.ones_like(rng),
                    (hi_out - lo_out) / torch.where(const, torch.ones_like(rng), rng),
                )
                offset = torch.where(const, -xmin, lo_out - scale * xmin)
            elif key_mode == "gaussian":
                const = std < eps
                scale = torch.where(
                    const, torch.ones_like(std), 1.0 / torch.where(const, torch.ones_like(std), std)
                )
                offset = torch.where(const, -mean, -mean * scale)
            else:
                raise ValueError(
                    f"unknown normaliser mode {key_mode!r} (known: limits, gaussian, identity)"
                )
            for stat, v in (
                ("scale", scale),
                ("offset", offset),
                ("min", xmin),
                ("max", xmax),
                ("mean", mean),
                ("std", std),
            ):
                getattr(self, self._name(key, stat)).copy_(v.float())
            getattr(self, self._name(key, "fitted")).fill_(True)
        return self

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return x * self._get(key, "scale") + self._get(key, "offset")

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        return (y - self._get(key, "offset")) / self._get(key, "scale")

    def stats(self, key: str) -> dict[str, torch.Tensor]:
        """Input statistics (min, max, mean, std) of a fitted key."""
        return {s: self._get(key, s) for s in ("min", "max", "mean", "std")}

    def is_fitted(self, key: str) -> bool:
        """Reads the key's flag once; later calls (and _get) answer from Python, so a trace or an
        export of normalize() contains no data-dependent branch."""
        if key in self._fitted_keys:
            return True
        if key in self.dims and bool(getattr(self, self._name(key, "fitted"))):
            self._fitted_keys.add(key)
            return True
        return False
