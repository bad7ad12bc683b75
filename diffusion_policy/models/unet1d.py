"""1D temporal U-Net with FiLM conditioning: the denoiser of Diffusion Policy (paper §3.1, spec §3.1).

Shapes: sample (B, T, Da) -> (B, T, Da); timestep int, 0-d or (B,); global_cond (B, G).
Quirks kept on purpose so parameter counts and behaviour match the paper's model: FiLM is
`scale * h + bias` (no 1 +), both up levels upsample, and the first level's skip is never consumed.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F


class SinusoidalPosEmb(nn.Module):
    """Timestep -> [sin(t f), cos(t f)] with f_i = exp(-ln(10000) i / (half - 1))."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int = 8):
        super().__init__(
            nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, c_out),
            nn.Mish(),
        )


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks with FiLM on the first's output, plus a residual path."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        cond_dim: int,
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                Conv1dBlock(c_in, c_out, kernel_size, n_groups),
                Conv1dBlock(c_out, c_out, kernel_size, n_groups),
            ]
        )
        self.c_out = c_out
        self.cond_predict_scale = cond_predict_scale
        self.cond_encoder = nn.Sequential(
            nn.Mish(), nn.Linear(cond_dim, 2 * c_out if cond_predict_scale else c_out)
        )
        self.residual_conv = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x (B, C_in, T), cond (B, cond_dim) -> (B, C_out, T)
        return self.forward_film(x, self.cond_encoder(cond))

    def forward_film(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """The block with its FiLM vector already computed: film (B, 2*C_out) = [scale, bias] or (B, C_out)."""
        h = self.blocks[0](x)
        if self.cond_predict_scale:
            h = film[:, : self.c_out, None] * h + film[:, self.c_out :, None]
        else:
            h = h + film[:, :, None]
        h = self.blocks[1](h)
        return h + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    """Denoiser eps_theta(x_t, t, cond) over an action chunk; conditioning enters every block via FiLM."""

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int,
        diffusion_step_embed_dim: int = 256,
        down_dims: tuple[int, ...] | list[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
    ):
        super().__init__()
        dims = [input_dim, *down_dims]
        d = diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(d), nn.Linear(d, 4 * d), nn.Mish(), nn.Linear(4 * d, d)
        )
        cond_dim = d + global_cond_dim

        def block(ci: int, co: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(
                ci, co, cond_dim, kernel_size, n_groups, cond_predict_scale
            )

        pairs = list(zip(dims[:-1], dims[1:]))
        self.down_modules = nn.ModuleList()
        for i, (ci, co) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down_modules.append(
                nn.ModuleList(
                    [
                        block(ci, co),
                        block(co, co),
                        nn.Conv1d(co, co, 3, 2, 1) if not last else nn.Identity(),
                    ]
                )
            )
        mid = dims[-1]
        self.mid_modules = nn.ModuleList([block(mid, mid), block(mid, mid)])
        self.up_modules = nn.ModuleList()
        for ci, co in reversed(pairs[1:]):
            # (co channels from below) + (co skip) -> ci; then upsample
            self.up_modules.append(
                nn.ModuleList(
                    [block(2 * co, ci), block(ci, ci), nn.ConvTranspose1d(ci, ci, 4, 2, 1)]
                )
            )
        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], input_dim, 1),
        )
        self.n_levels = len(down_dims)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        global_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # sample (B, T, Da), timestep (B,) or scalar, global_cond (B, G) -> (B, T, Da)
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(sample.shape[0])
        cond = self.diffusion_step_encoder(t)
        if global_cond is not None:
            cond = torch.cat([cond, global_cond], dim=-1)
        return self.forward_film(sample, [b.cond_encoder(cond) for b in self.res_blocks()])

    def res_blocks(self) -> list[ConditionalResidualBlock1D]:
        """Every FiLM block, in the order forward_film consumes their FiLM vectors."""
        out = []
        for res1, res2, _ in self.down_modules:
            out += [res1, res2]
        out += list(self.mid_modules)
        for res1, res2, _ in self.up_modules:
            out += [res1, res2]
        return out

    def forward_film(self, sample: torch.Tensor, films: list[torch.Tensor]) -> torch.Tensor:
        """The network with each block's FiLM vector given (see `film_table`), in res_blocks() order."""
        x = rearrange(sample, "b t d -> b d t")
        skips, i = [], 0
        for res1, res2, down in self.down_modules:
            x = res2.forward_film(res1.forward_film(x, films[i]), films[i + 1])
            i += 2
            skips.append(x)
            x = down(x)
        for res in self.mid_modules:
            x = res.forward_film(x, films[i])
            i += 1
        for res1, res2, up in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = up(res2.forward_film(res1.forward_film(x, films[i]), films[i + 1]))
            i += 2
        x = self.final_conv(x)
        return rearrange(x, "b d t -> b t d")

    def film_table(
        self, timesteps: torch.Tensor, global_cond: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """FiLM vectors of every block for K timesteps x B conditions: a list of (K, B, 2*C_out).

        A block's FiLM is Linear(Mish([emb(t), cond])) = W_t Mish(emb(t)) + W_c Mish(cond) + b, so a
        sampler that runs K steps on one condition needs the linear layers once per chunk, not once
        per step. The result equals forward()'s FiLM up to float rounding.
        """
        m_t = F.mish(self.diffusion_step_encoder(timesteps))  # (K, d)
        d = m_t.shape[-1]
        m_c = F.mish(global_cond) if global_cond is not None else None
        out = []
        for block in self.res_blocks():
            lin = block.cond_encoder[1]
            e_t = F.linear(m_t, lin.weight[:, :d])  # (K, F)
            e_c = (
                F.linear(m_c, lin.weight[:, d:], lin.bias)
                if m_c is not None
                else lin.bias[None].expand(1, -1)
            )  # (B, F)
            out.append(e_t[:, None] + e_c[None])
        return out

    # the precomputed-conditioning interface of diffusion_sampling.DDIMSampler (the transformer
    # has its own): per-step conditioning once per chunk, then the network on it
    step_table = film_table
    forward_step = forward_film
