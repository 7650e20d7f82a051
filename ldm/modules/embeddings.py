"""Timestep embeddings for denoisers: sinusoidal features of (possibly fractional) t, then an MLP.

The sinusoid is the Transformer position encoding (Vaswani et al. 2017, sec. 3.5) applied to the
diffusion time, as in DDPM (Ho et al. 2020, appendix B) and LDM; the layout ``[cos | sin]`` with
frequencies ``max_period^(-i/half)`` is the one Stable Diffusion was trained with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[cos(t w_i) | sin(t w_i)]``, ``w_i = max_period^(-i/(dim/2))`` (Transformer sec. 3.5).

    ``t``: (B,) float or integer timesteps (fractional values are fine: samplers pass them).
    Returns (B, dim) float32 (an odd ``dim`` gets one zero column at the end).
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor (B,), got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_scale_embedding(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """Fourier features of a classifier-free guidance scale for w-conditioning (Meng et al. 2023, "On
    distillation of guided diffusion models", sec. 3.1; LCM, Luo et al. 2023, sec. 4.2), in the layout of
    LCM's released models: ``[sin(ω' f_i) | cos(ω' f_i)]`` with ``ω' = 1000 (s − 1)`` for the standard scale
    ``s`` (ω = s − 1 is LCM's guidance weight, eq. 9) and ``f_i = 10000^(−i/(dim/2 − 1))``.

    ``scale``: (B,) standard CFG scales (1 = no guidance). Returns (B, dim) float32 (zero column for odd dim).
    """
    if scale.ndim != 1:
        raise ValueError(f"guidance scales must be a 1-D tensor (B,), got shape {tuple(scale.shape)}")
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=scale.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    angles = (1000.0 * (scale.float() - 1))[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """``t -> Linear(SiLU(Linear(sinusoid(t) + P c)))``: the DDPM/LDM time-conditioning MLP (width ``4 * channels``).

    With ``cond_dim`` an extra input ``c`` (B, cond_dim), e.g. :func:`guidance_scale_embedding`, joins the
    sinusoid through a bias-free projection ``P`` that starts at zero, so a model extended with it computes
    exactly what it computed before (diffusers' ``time_cond_proj_dim``, as LCM's models use it).
    """

    def __init__(self, channels: int, embed_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)
        self.cond_proj = nn.Linear(cond_dim, channels, bias=False) if cond_dim else None
        if self.cond_proj is not None:
            nn.init.zeros_(self.cond_proj.weight)

    def forward(self, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        emb = timestep_embedding(t, self.channels).to(self.linear_1.weight.dtype)
        if self.cond_proj is not None:
            if condition is None:
                raise ValueError("this time embedding takes a condition (cond_dim is set); pass one")
            emb = emb + self.cond_proj(condition.to(emb.dtype))
        return self.linear_2(F.silu(self.linear_1(emb)))


class PooledTextEmbedding(nn.Module):
    """``pooled -> Linear(SiLU(Linear(pooled)))``, added to the time embedding: a global text signal for every
    ResBlock, as GLIDE feeds the final token's embedding in place of the class embedding (Nichol et al.
    2022, sec. 2.3) and SDXL adds its pooled CLIP embedding (Podell et al. 2023, sec. 2.1)."""

    def __init__(self, pooled_dim: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(pooled_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(pooled.to(self.linear_1.weight.dtype))))


def spatial_position_embedding(height: int, width: int, dim: int, max_period: float = 10000.0,
                               device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos position features (dim, height, width): half the channels encode the row, half the
    column, each with the 1-D sinusoid of ``timestep_embedding`` (MAE, He et al. 2022; DiT, Peebles & Xie 2023).

    ``dim`` must be divisible by 4 (cos and sin for each of the two axes).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    rows = timestep_embedding(torch.arange(height, device=device, dtype=torch.float32), dim // 2, max_period)
    cols = timestep_embedding(torch.arange(width, device=device, dtype=torch.float32), dim // 2, max_period)
    return torch.cat([rows[:, None, :].expand(height, width, dim // 2),
                      cols[None, :, :].expand(height, width, dim // 2)], dim=-1).permute(2, 0, 1)
