"""Attention blocks of the Latent Diffusion U-Net (Rombach et al. 2022, sec. 3.3).

``SpatialTransformer``: GroupNorm -> proj_in -> depth x [self-attention, cross-attention to the text
tokens, GEGLU feed-forward, each pre-LayerNorm with a residual] -> proj_out (zero-initialised) -> + x.
Attention is ``softmax(Q K^T / sqrt(d)) V`` (Vaswani et al. 2017, eq. 1; in LDM sec. 3.3 with
Q = W_Q phi(z_t) and K, V = W_K tau(y), W_V tau(y) from the conditioning tokens), computed by
``F.scaled_dot_product_attention``.

``proj_in``/``proj_out`` are ``nn.Linear`` on the (B, H*W, C) token view (a free view when the
input is channels_last) and GEGLU's value/gate halves are two matmuls; weights convert exactly to
diffusers' 1x1-conv projections and fused ``ff.net.0.proj`` (``ldm.interop.diffusers_unet``).

The kernel is chosen by :func:`attention_backend` (``ldm.fastpath`` picks it by measurement): "sdpa"
(``F.scaled_dot_product_attention``, the default) or "math" (two matmuls and a softmax: the same formula;
on CPU in bf16 torch's fused kernel has a slow backward). Self-attention computes Q, K, V with one matmul
against the concatenated weights (``Attention.fused_qkv``): the parameters stay ``q``, ``k``, ``v``, so
checkpoints and the diffusers conversion are unchanged. Cross-attention's keys and values depend on the text
alone: a sampling run computes them once (``ldm.modules.reuse``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.reuse import reused

BACKENDS = ("sdpa", "math")
_backend = "sdpa"
_block_dtype: torch.dtype | None = None  # autocast inside the SpatialTransformers only (None: off)


@contextmanager
def transformer_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside the block, every :class:`SpatialTransformer` runs under ``torch.autocast(dtype)`` (its linears and
    attention in ``dtype``, its output cast back), the convolutions around it stay in their own precision."""
    global _block_dtype
    previous, _block_dtype = _block_dtype, dtype
    try:
        yield
    finally:
        _block_dtype = previous


def get_attention_backend() -> str:
    """The attention kernel in use: "sdpa" or "math"."""
    return _backend


def set_attention_backend(name: str) -> None:
    """Select the kernel every :class:`Attention` uses from now on ("sdpa" or "math")."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: use one of {list(BACKENDS)}")
    _backend = name


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use the kernel ``name`` inside the block, then restore the previous one."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d)) V`` (Vaswani et al. 2017, eq. 1) for (B, heads, N, d) queries and (B, heads, L, d)
    keys/values; ``attn_mask`` (B, 1, 1, L) bool, True where a key may be attended to.
    Kernel: :func:`attention_backend`. On a CPU the "math" kernel keeps the scores keys-major, (B, heads, L, N), when
    there are fewer keys than queries (cross-attention to a short prompt): torch's CPU softmax vectorises along the
    reduced dimension when it is the last one, and 10 keys fill less than one AVX-512 vector (12x slower than over
    the queries for (48, 64, 10) scores here, 5x for the backward)."""
    if _backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    scale = q.shape[-1] ** -0.5
    if k.shape[-2] < q.shape[-2] and q.device.type == "cpu":  # fewer keys than queries: scores (B, heads, L, N)
        scores = (k * scale) @ q.transpose(-1, -2)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask.transpose(-1, -2), float("-inf"))
        return scores.softmax(dim=-2).transpose(-1, -2) @ v
    scores = (q * scale) @ k.transpose(-1, -2)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C/heads), a strided view (no copy)."""
    batch, tokens, _ = x.shape
    return x.view(batch, tokens, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads*d)."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


class Attention(nn.Module):
    """Multi-head attention ``softmax(Q K^T / sqrt(d)) V`` (Vaswani et al. 2017, eq. 1; LDM sec. 3.3).

    Q comes from the image tokens ``x``; K and V from ``context`` (cross-attention, ``context_dim`` set)
    or from ``x`` itself (self-attention). ``attn_mask``: (B, 1, 1, L) bool, True where a key may be
    attended to (padding tokens False). ``qkv_bias``: biases on the Q, K, V projections (LDM: none; ViT/DiT: yes).
    """

    fused_qkv = True  # self-attention: one matmul for Q, K, V (a class switch, for the on/off benchmark)

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        kv_dim = context_dim or dim
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if context is None and self.fused_qkv and all(type(m) is nn.Linear for m in (self.q, self.k, self.v)):
            q, k, v = self.qkv(x)  # (a LoRA-wrapped projection is not a plain Linear: it takes the path below)
        else:
            q = split_heads(self.q(x), self.num_heads)
            if context is None:
                k, v = split_heads(self.k(x), self.num_heads), split_heads(self.v(x), self.num_heads)
            else:  # text-only: computed once per sampling run (ldm.modules.reuse)
                k, v = reused(self, (context,), lambda: (split_heads(self.k(context), self.num_heads),
                                                         split_heads(self.v(context), self.num_heads)))
        return self.out(merge_heads(attention(q, k, v, attn_mask)))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V of self-attention, each (B, heads, N, d), from ONE matmul with the stacked weights [W_Q; W_K; W_V]
        (the same products as three separate projections)."""
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        biases = [self.q.bias, self.k.bias, self.v.bias]
        bias = None if biases[0] is None else torch.cat(biases)
        batch, tokens, _ = x.shape
        qkv = F.linear(x, weight, bias).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]


class GEGLUFeedForward(nn.Module):
    """``out(value(x) * GELU(gate(x)))``: FFN_GEGLU of Shazeer 2020 (sec. 2), inner width mult*dim (SD: 4).

    ``value`` and ``gate`` are separate matmuls rather than one chunked one: the same function, but
    without the strided halves and the gradient concatenation (~25 % faster fwd+bwd on CPU).
    """

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.value = nn.Linear(dim, inner)
        self.gate = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.value(x) * F.gelu(self.gate(x)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each with a residual (LDM sec. 3.3)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, ff_mult: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, attn_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image feature map (B, C, H, W) attends to itself and to context tokens (B, L, D); returns x + update.

    GroupNorm -> proj_in -> ``depth`` TransformerBlocks -> proj_out (zero-initialised, so the block
    starts as the identity) -> residual (LDM sec. 3.3, Fig. 3).
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int, depth: int = 1, num_groups: int = 32,
                 ff_mult: int = 4):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"SpatialTransformer: {channels} channels do not split into {num_heads} heads; "
                             "choose num_heads (or head_dim) that divides every level's channel count")
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, context_dim, num_heads, ff_mult) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if _block_dtype is None:
            return x + self._update(x, context, attn_mask)
        with torch.autocast(x.device.type, _block_dtype):
            h = self._update(x, context, attn_mask)
        return x + h.to(x.dtype)

    def _update(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # NCHW -> (B, H*W, C): a view for channels_last inputs, one copy otherwise.
        h = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context, attn_mask)
        return self.proj_out(h).view(batch, height, width, channels).permute(0, 3, 1, 2)
