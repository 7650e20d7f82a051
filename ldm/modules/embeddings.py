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


class TimestepEmbedding(nn.Module):
    """``t -> Linear(SiLU(Linear(sinusoid(t))))``: the DDPM/LDM time-conditioning MLP (width ``4 * channels``)."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.channels).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))
