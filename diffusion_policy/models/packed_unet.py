"""ConditionalUnet1D re-laid out for CPU inference: time-major activations and GEMM-packed weights.

At batch 1 an action chunk is 16 steps long, so every convolution is a GEMM with 4 to 16 rows.
CPU convolution kernels are slow at that shape (a 256->256, k=5 conv on 4 steps: ~110 us with
F.conv1d, ~20 us as rows @ W^T on the same core), because they are built for wide images. So the
CPU path keeps activations time-major (B, L, C), turns each conv into unfold + one addmm against a
weight packed once as (C_in * k, C_out), and the stride-2 transposed conv into one GEMM plus an
overlap-add. Same arithmetic as the reference, different summation order.
"""

from __future__ import annotations

import torch
from torch import nn


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

    forward_step = forward_film  # DDIMSampler's name for it (see ConditionalUnet1D.step_table)
