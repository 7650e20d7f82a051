"""Attention blocks: exact math against hand-written formulas, masking, zero-init, memory formats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.modules.attention import Attention, GEGLUFeedForward, SpatialTransformer, TransformerBlock


def reference_attention(attn: Attention, x: torch.Tensor, context: torch.Tensor, keep: torch.Tensor | None = None):
    """softmax(Q K^T / sqrt(d)) V per head, written out with explicit loops over heads."""
    heads, dim = attn.num_heads, x.shape[-1]
    d = dim // heads
    q, k, v = x @ attn.q.weight.T, context @ attn.k.weight.T, context @ attn.v.weight.T
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d)
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        outs.append(scores.softmax(-1) @ v[..., sl])
    return torch.cat(outs, -1) @ attn.out.weight.T + attn.out.bias


def test_self_and_cross_attention_match_the_formula():
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 5, 12), torch.randn(2, 3, 7)
    self_attn, cross = Attention(12, num_heads=3), Attention(12, num_heads=3, context_dim=7)
    torch.testing.assert_close(self_attn(x), reference_attention(self_attn, x, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cross(x, ctx), reference_attention(cross, x, ctx), atol=1e-5, rtol=1e-5)


def test_cross_attention_mask_ignores_padding_tokens():
    torch.manual_seed(0)
    cross = Attention(8, num_heads=2, context_dim=6)
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 5, 6)
    keep = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
    out = cross(x, ctx, keep[:, None, None, :])
    torch.testing.assert_close(out, reference_attention(cross, x, ctx, keep), atol=1e-5, rtol=1e-5)
    # each row equals attention over its kept tokens only, whatever the padding holds
    noisy = ctx.clone()
    noisy[~keep] = 1e3 * torch.randn(int((~keep).sum()), 6)
    torch.testing.assert_close(cross(x, noisy, keep[:, None, None, :]), out)
    torch.testing.assert_close(out[0], cross(x[:1], ctx[:1, :2])[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1], cross(x[1:], ctx[1:, :4])[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(cross(x, ctx), out)  # without the mask the padding does matter


def test_geglu_feed_forward_formula():
    torch.manual_seed(0)
    ff, x = GEGLUFeedForward(4), torch.randn(3, 4)
    expected = ff.out((x @ ff.value.weight.T + ff.value.bias) * F.gelu(x @ ff.gate.weight.T + ff.gate.bias))
    torch.testing.assert_close(ff(x), expected)
    assert ff.value.out_features == ff.gate.out_features == 16


def test_transformer_block_is_three_pre_norm_residuals():
    torch.manual_seed(0)
    block, x, ctx = TransformerBlock(8, 5, num_heads=2), torch.randn(2, 6, 8), torch.randn(2, 3, 5)
    h = x + block.attn1(block.norm1(x))
    h = h + block.attn2(block.norm2(h), ctx)
    torch.testing.assert_close(block(x, ctx), h + block.ff(block.norm3(h)))


def test_spatial_transformer_starts_as_identity_and_learns_a_residual():
    torch.manual_seed(0)
    st = SpatialTransformer(16, 5, num_heads=2, depth=2, num_groups=4)
    x, ctx = torch.randn(2, 16, 3, 4), torch.randn(2, 3, 5)
    assert torch.equal(st(x, ctx), x)  # proj_out is zero-initialised
    torch.nn.init.normal_(st.proj_out.weight)
    out = st(x, ctx)
    assert out.shape == x.shape and not torch.allclose(out, x)
    # tokens are the H*W pixels in row-major order
    tokens = st.norm(x).flatten(2).transpose(1, 2)
    h = st.proj_in(tokens)
    for block in st.blocks:
        h = block(h, ctx)
    expected = x + st.proj_out(h).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(st(x.contiguous(memory_format=torch.channels_last), ctx), out)


def test_heads_must_divide_channels():
    with pytest.raises(ValueError, match="heads"):
        SpatialTransformer(24, 8, num_heads=5, num_groups=8)
