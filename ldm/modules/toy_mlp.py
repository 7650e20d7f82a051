"""The ε-model of the 2-D swiss roll (``ldm toy``): Fourier features of the point and the timestep, then an MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.modules.embeddings import timestep_embedding


class ToyMLP(nn.Module):
    """ε-model for 2-D points: [Fourier features of x, emb(t)] → SiLU MLP → 2 numbers.

    Each coordinate goes through the sinusoidal embedding at scale ``x_scale`` (Fourier features,
    Tancik et al. 2020): a plain MLP on raw (x, y) learns the thin spiral far more slowly."""

    def __init__(self, hidden: int = 128, depth: int = 3, emb_dim: int = 32, x_scale: float = 25.0) -> None:
        super().__init__()
        self.emb_dim, self.x_scale = emb_dim, x_scale
        layers: list[nn.Module] = [nn.Linear(3 * emb_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """ε̂(x_t, t) for points x (B, 2) and float timesteps t (B,)."""
        features = [timestep_embedding(x[:, i] * self.x_scale, self.emb_dim) for i in range(2)]
        h = torch.cat(features + [timestep_embedding(t, self.emb_dim)], 1)
        return self.net(h).to(x.dtype)
