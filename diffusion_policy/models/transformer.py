"""Time-series diffusion transformer: the paper's second denoiser (DP-T, Chi et al. 2023, §3.1).

Action tokens (one per chunk step) form a decoder sequence; the conditioning tokens are
[diffusion step, obs step 0, ..., obs step To-1], mixed by a small encoder, and every decoder layer
cross-attends to them ("memory"). With causal attention an action token sees only itself and the
actions before it, and the conditioning tokens up to its own step: action k sees the step token and
the observations 0..k (obs[k] and action[k] share a step, see policies/base.py).

Shapes: sample (B, T, Da) -> (B, T, Da); timestep int, 0-d or (B,); cond (B, To, Do).
Layers, initialisation and parameter names follow the original `TransformerForDiffusion` so that
its parameter count (8,965,122 for the Push-T low-dim sizes) is matched exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion_policy.models.unet1d import SinusoidalPosEmb

# modules whose `weight` is regularised by weight decay; everything else (biases, LayerNorm,
# positional embeddings) is not: the original's get_optim_groups rule
DECAYED_MODULES = (nn.Linear, nn.MultiheadAttention)


def _layer_kwargs(n_emb: int, n_head: int, p_drop: float) -> dict:
    """Pre-norm GELU layers with a 4x feed-forward: the original's (pre-norm matters for stability)."""
    return dict(
        d_model=n_emb,
        nhead=n_head,
        dim_feedforward=4 * n_emb,
        dropout=p_drop,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean 'may attend' matrix as the float mask nn.Transformer adds to the logits."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


class TransformerForDiffusion(nn.Module):
    """Denoiser eps_theta(x_t, t, o) over action tokens, conditioned through cross-attention."""

    def __init__(
        self,
        input_dim: int,
        cond_dim: int,
        horizon: int,
        n_obs_steps: int,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.01,
        causal_attn: bool = True,
        n_cond_layers: int = 0,
    ):
        super().__init__()
        n_cond = 1 + n_obs_steps  # the diffusion step, then one token per observation step
        self.input_emb = nn.Linear(input_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, n_cond, n_emb))
        layer = _layer_kwargs(n_emb, n_head, p_drop_attn)
        if n_cond_layers > 0:
            self.encoder: nn.Module = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(**layer), n_cond_layers, enable_nested_tensor=False
            )
        else:
            self.encoder = nn.Sequential(
                nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb)
            )
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), n_layer)
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, input_dim)
        self.causal = causal_attn
        if causal_attn:
            t = torch.arange(horizon)
            s = torch.arange(n_cond)
            # action t attends to actions <= t, and to cond token s (s - 1 is its obs step) if s - 1 <= t
            self.register_buffer("mask", additive_mask(t[None, :] <= t[:, None]), persistent=False)
            self.register_buffer(
                "memory_mask", additive_mask(s[None, :] - 1 <= t[:, None]), persistent=False
            )
        else:
            self.mask = self.memory_mask = None
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """GPT-style: N(0, 0.02) weights, zero biases, unit LayerNorms (as the original)."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.normal_(m.in_proj_weight, std=0.02)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def decay_split(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decayed, not decayed): weights of Linear and attention projections, and the rest."""
        decay = {
            id(p)
            for m in self.modules()
            if isinstance(m, DECAYED_MODULES)
            for name, p in m.named_parameters(recurse=False)
            if name.endswith("weight")
        }
        params = list(self.parameters())
        return [p for p in params if id(p) in decay], [p for p in params if id(p) not in decay]

    def memory(self, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Conditioning tokens after the encoder: timestep (B,), cond (B, To, Do) -> (B, 1 + To, E)."""
        tokens = torch.cat([self.time_emb(timestep)[:, None], self.cond_obs_emb(cond)], dim=1)
        return self.encoder(self.drop(tokens + self.cond_pos_emb))

    def forward_memory(self, sample: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The decoder and head on given conditioning tokens (see `memory`)."""
        x = self.drop(self.input_emb(sample) + self.pos_emb[:, : sample.shape[1]])
        x = self.decoder(x, memory, tgt_mask=self.mask, memory_mask=self.memory_mask)
        return self.head(self.ln_f(x))

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, cond: torch.Tensor
    ) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t[None]
        return self.forward_memory(sample, self.memory(t.expand(sample.shape[0]), cond))

    # --- the precomputed-conditioning interface of diffusion_sampling.DDIMSampler ----------------
    def step_table(self, timesteps: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        """The memory of K timesteps x B conditions, [(K, B, 1 + To, E)]: once per chunk, not per step."""
        k, b = timesteps.shape[0], cond.shape[0]
        t = timesteps[:, None].expand(k, b).reshape(k * b)
        mem = self.memory(t, cond.repeat(k, 1, 1))
        return [mem.view(k, b, *mem.shape[1:])]

    def forward_step(self, sample: torch.Tensor, table: list[torch.Tensor]) -> torch.Tensor:
        return self.forward_memory(sample, table[0])
