"""A context refiner: a few bidirectional transformer layers over the text tokens, inside the denoiser.

The text encoder's token states ``τθ(y)`` (LDM eq. 3) come from a frozen tower trained for another objective
(CLIP's contrastive loss trains only the pooled token; a causal tower's early tokens never see the words after
them). A refiner lets the denoiser's own loss shape the tokens it cross-attends to: every token sees the whole
prompt, so "diamond" in "a green diamond above a blue square" can carry "green" and "above". This is the
context refiner of Lumina-Image 2.0 (Qin et al. 2025, sec. 3.1) and the idea of MM-DiT's separate text-token
weights (Esser et al. 2024, SD3, sec. 4): text tokens processed by weights trained with the diffusion loss.

Each layer is pre-LayerNorm self-attention (padding keys masked) and a GEGLU feed-forward, each with a residual
(Vaswani et al. 2017; Shazeer 2020); their output projections start at zero, so a new refiner is exactly the
identity and a denoiser fine-tuned with one added starts where it was.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.modules.attention import Attention, GEGLUFeedForward


class RefinerLayer(nn.Module):
    """``x + Attn(LN(x))``, then ``x + FF(LN(x))``, over (B, L, D) tokens; both outputs zero-initialised."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, ff_mult)
        for out in (self.attn.out, self.ff.out):
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.ff(self.norm2(x))


class ContextRefiner(nn.Module):
    """``layers`` :class:`RefinerLayer` s over the conditioning tokens (B, L, D) → (B, L, D).

    ``attn_mask`` (B, 1, 1, L) bool, True on real tokens: padding is never attended to (its own rows are
    computed but every cross-attention masks them too)."""

    def __init__(self, dim: int, layers: int, num_heads: int, ff_mult: int = 2):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ContextRefiner: {dim}-d tokens do not split into {num_heads} heads")
        self.layers = nn.ModuleList(RefinerLayer(dim, num_heads, ff_mult) for _ in range(layers))

    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            tokens = layer(tokens, attn_mask)
        return tokens
