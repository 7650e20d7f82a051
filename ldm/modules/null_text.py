"""The unconditional "text encoder": every prompt maps to the same single zero token.

A registered "text_encoder"-kind part with no weights, for unconditional models (likelihood in bits/dim is an
unconditional quantity): the denoiser's cross-attention then sees one constant token, i.e. it learns p(x). It
has the conditioner API the pipeline, LatentDiffusion and the latent cache use (``condition``, ``token_dim``,
``pooled_dim``, ``freeze``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ldm.conditioning import Conditioning


@dataclass
class UnconditionalTextConfig:
    """Width of the constant token (the denoiser's ``context_dim``) and of an optional pooled vector."""

    token_dim: int = 32
    pooled_dim: int | None = None


class UnconditionalText(nn.Module):
    """``condition(prompts)`` → one zero token per prompt (and zero pooled vectors if ``pooled_dim``)."""

    config_class = UnconditionalTextConfig

    def __init__(self, config: UnconditionalTextConfig | None = None) -> None:
        super().__init__()
        self.config = config or UnconditionalTextConfig()

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    @property
    def pooled_dim(self) -> int | None:
        return self.config.pooled_dim

    def freeze(self) -> UnconditionalText:
        return self.eval()

    def condition(self, prompts: Sequence[str]) -> Conditioning:
        """The same conditioning for every prompt: tokens (B, 1, token_dim) of zeros, no mask."""
        b = len(prompts)
        pooled = torch.zeros(b, self.config.pooled_dim) if self.config.pooled_dim else None
        return Conditioning(torch.zeros(b, 1, self.config.token_dim), None, pooled)
