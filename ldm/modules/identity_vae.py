"""The identity first stage: pixel-space diffusion through the same pipeline, training and likelihood code.

A registered "vae"-kind part with the first-stage API (``encode``/``decode``, ``encode_latents``/
``decode_latents``, ``config.z_channels``, ``config.downsample_factor``) and no weights: the diffusion variable
*is* the image in [−1, 1]. With ``z_channels = 1`` it models grayscale images: ``encode`` takes the mean of the
RGB channels (exact for gray images, which the shard loader decodes to three equal channels) and ``decode``
repeats it, so the model and its bits/dim count each pixel once. Being the identity, a bound on −log p(z) with
a discretized decoder is a bound on the 8-bit images' −log P(x): the pixel-space bits/dim of DDPM/iDDPM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.modules.distributions import DiagonalGaussian


@dataclass
class IdentityFirstStageConfig:
    """``in_channels`` of the images; ``z_channels`` 3 (RGB pixels, = in_channels) or 1 (grayscale)."""

    in_channels: int = 3
    z_channels: int = 3

    def __post_init__(self) -> None:
        if self.z_channels not in (1, self.in_channels):
            raise ValueError(f"identity first stage: z_channels must be 1 (grayscale) or in_channels="
                             f"{self.in_channels}, got {self.z_channels}")

    @property
    def downsample_factor(self) -> int:
        return 1

    @property
    def scaling_factor(self) -> float:
        """1: the latents are the pixels in [−1, 1] (what the latent cache and the discretized decoder assume)."""
        return 1.0

    @property
    def shift_factor(self) -> float:
        return 0.0


class IdentityFirstStage(nn.Module):
    """Pixels as latents (see the module doc). ``is_identity`` tells likelihood code the latents are 8-bit pixels."""

    config_class = IdentityFirstStageConfig
    is_identity = True

    def __init__(self, config: IdentityFirstStageConfig | None = None) -> None:
        super().__init__()
        self.config = config or IdentityFirstStageConfig()

    @property
    def downsample_factor(self) -> int:
        return 1

    def _to_z(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"expected images shaped (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        return x.mean(1, keepdim=True) if c.z_channels == 1 and c.in_channels > 1 else x

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """A deterministic "posterior" at the pixels (variance 0)."""
        return DiagonalGaussian(self._to_z(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        if z.ndim != 4 or z.shape[1] != c.z_channels:
            raise ValueError(f"expected latents shaped (B, {c.z_channels}, H, W), got {tuple(z.shape)}")
        return z.expand(-1, c.in_channels, -1, -1) if c.z_channels != c.in_channels else z

    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        return self._to_z(x)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)
