"""The cross-attention U-Net: shapes, SD 1.5 size, config checks, export round trip, masking,
gradient checkpointing and channels_last (tiny seeded models; parity with diffusers is in
test_interop_unet.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ldm.conditioning import Conditioning as C
from ldm.io import load_part, save_part
from ldm.modules.embeddings import spatial_position_embedding, timestep_embedding
from ldm.modules.unet import UNet, UNetConfig

TINY = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                  num_heads=2, context_dim=6, num_groups=4)


def tiny_unet(config: UNetConfig = TINY, seed: int = 0) -> UNet:
    """A seeded U-Net whose zero-initialised layers are randomised, so every path reaches the output."""
    torch.manual_seed(seed)
    unet = UNet(config)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.3)
    return unet


def inputs(config: UNetConfig = TINY, batch: int = 2, size: tuple[int, int] = (8, 8), tokens: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, config.in_channels, *size, generator=g), torch.rand(batch, generator=g) * 999,
            torch.randn(batch, tokens, config.context_dim, generator=g))


def test_timestep_embedding_values():
    # dim 4 -> frequencies 10000^(-0/2) = 1 and 10000^(-1/2) = 0.01; layout [cos | sin]
    emb = timestep_embedding(torch.tensor([0.0, 2.5]), 4)
    expected = torch.tensor([[1, 1, 0, 0], [math.cos(2.5), math.cos(0.025), math.sin(2.5), math.sin(0.025)]])
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(torch.tensor([3]), 5).shape == (1, 5)


@pytest.mark.parametrize("config,size", [
    (TINY, (8, 8)),
    (TINY, (7, 5)),  # odd sizes: upsampling follows the skip's size
    (UNetConfig(in_channels=3, out_channels=6, model_channels=8, channel_mult=(1, 1, 2), num_res_blocks=2,
                attention_resolutions=(2,), num_heads=None, head_dim=4, transformer_depth=2, context_dim=3,
                num_groups=2), (8, 12)),
    (UNetConfig(model_channels=4, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), num_heads=1,
                context_dim=2, num_groups=1), (4, 4)),
])
def test_output_has_the_input_shape(config: UNetConfig, size):
    unet = tiny_unet(config)
    x, t, ctx = inputs(config, size=size)
    out = unet(x, t, C(ctx))
    assert out.shape == (2, config.out_channels, *size) and torch.isfinite(out).all()


def test_fresh_unet_outputs_zero_and_t_is_fractional():
    x, t, ctx = inputs()
    torch.manual_seed(0)
    assert torch.equal(UNet(TINY)(x, t, C(ctx)), torch.zeros_like(x))  # zero-initialised conv_out
    unet = tiny_unet()
    outs = [unet(x, torch.full((2,), v), C(ctx)) for v in (10.0, 10.5, 11.0)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    torch.testing.assert_close(unet(x, 10.5, C(ctx)), outs[1])  # a scalar t is broadcast over the batch


def test_sd15_parameter_count_on_meta_device():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert UNetConfig() == UNetConfig.sd15()
    heads = {m.num_heads for m in unet.modules() if hasattr(m, "num_heads")}
    assert heads == {8}


def test_head_dim_sets_heads_per_level():
    config = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                        num_heads=None, head_dim=4, context_dim=6, num_groups=4)
    unet = UNet(config)
    assert unet.down[0].attn[0].blocks[0].attn1.num_heads == 2
    assert unet.down[1].attn[0].blocks[0].attn1.num_heads == 4


def test_ff_mult_sets_the_feed_forward_width():
    config = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                        num_heads=2, context_dim=6, num_groups=4)
    wide, narrow = UNet(config), UNet(dataclasses.replace(config, ff_mult=2))
    assert wide.down[1].attn[0].blocks[0].ff.value.out_features == 4 * 16
    assert narrow.down[1].attn[0].blocks[0].ff.value.out_features == 2 * 16
    assert narrow.mid.attn.blocks[0].ff.gate.out_features == 2 * 16
    # value, gate (dim x inner + inner each) and out (inner x dim) lose 2 * 16 inner units in each of the four
    # 16-channel transformers (down level 1, up level 1 twice, middle)
    difference = sum(p.numel() for p in wide.parameters()) - sum(p.numel() for p in narrow.parameters())
    assert difference == 4 * (2 * 16) * (16 + 1 + 16 + 1 + 16)


@pytest.mark.parametrize("changes,match", [
    (dict(num_heads=8, head_dim=64), "exactly one of num_heads or head_dim"),
    (dict(num_heads=None, head_dim=None), "exactly one of num_heads or head_dim"),
    (dict(attention_resolutions=(3,)), "attention_resolutions"),
    (dict(attention_resolutions=(16,)), "attention_resolutions"),
    (dict(num_groups=24), "num_groups"),
    (dict(num_heads=7), "num_heads=7"),
    (dict(ff_mult=0), "ff_mult"),
])
def test_bad_config_is_a_clear_error(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(UNetConfig.sd15(), **changes)


def test_bad_inputs_are_clear_errors():
    unet = tiny_unet()
    x, t, ctx = inputs()
    with pytest.raises(ValueError, match="context_dim=6"):
        unet(x, t, C(torch.randn(2, 5, 7)))
    with pytest.raises(ValueError, match=r"t must be a \(B,\)"):
        unet(x, torch.zeros(3), C(ctx))
    with pytest.raises(ValueError, match="x must be"):
        unet(torch.randn(2, 3, 8, 8), t, C(ctx))
    with pytest.raises(ValueError, match="masks every token"):
        unet(x, t, C(ctx, torch.tensor([[True] * 5, [False] * 5])))


def test_export_round_trip(tmp_path):
    unet = tiny_unet(dataclasses.replace(TINY, num_heads=None, head_dim=4))
    save_part(unet, tmp_path / "unet")
    loaded = load_part(tmp_path / "unet")
    assert isinstance(loaded, UNet) and loaded.config == unet.config
    x, t, ctx = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, C(ctx)), unet.eval()(x, t, C(ctx)), atol=0, rtol=0)


def test_context_mask_ignores_padding_tokens():
    unet = tiny_unet().eval()
    x, t, ctx = inputs(tokens=6)
    keep = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    with torch.no_grad():
        masked = unet(x, t, C(ctx, keep))
        padded = ctx.clone()
        padded[0, 3:] = 50 * torch.randn(3, TINY.context_dim)
        torch.testing.assert_close(unet(x, t, C(padded, keep)), masked)
        torch.testing.assert_close(unet(x[:1], t[:1], C(ctx[:1, :3])), masked[:1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(unet(x, t, C(padded)), masked)  # unmasked padding changes the output


def test_gradient_checkpointing_gives_the_same_gradients():
    config = dataclasses.replace(TINY, dropout=0.0)
    plain, ckpt = tiny_unet(config), tiny_unet(dataclasses.replace(config, gradient_checkpointing=True))
    assert ckpt.gradient_checkpointing and not plain.gradient_checkpointing
    x, t, ctx = inputs()
    ctx.requires_grad_(True)
    grads = []
    for unet in (plain, ckpt):
        ctx.grad = None
        out = unet(x, t, C(ctx))
        (out**2).mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in unet.parameters()], ctx.grad.clone()))
    (out_a, g_a, c_a), (out_b, g_b, c_b) = grads
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c_a, c_b, atol=1e-6, rtol=1e-5)


def test_channels_last_gives_the_same_output_and_gradients():
    unet, x, (t, ctx) = tiny_unet(), inputs()[0], inputs()[1:]
    ref = unet(x, t, C(ctx))
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    unet_cl = unet.to(memory_format=torch.channels_last)
    out = unet_cl(x.contiguous(memory_format=torch.channels_last), t, C(ctx))
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for p, g in zip(unet_cl.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_spatial_position_embedding_is_the_2d_sinusoid():
    # 4 channels for the row, 4 for the column: [cos w0, cos w1, sin w0, sin w1]
    emb = spatial_position_embedding(3, 5, 8)
    assert emb.shape == (8, 3, 5)
    w1 = 10000.0 ** -0.5
    torch.testing.assert_close(emb[:, 2, 4],
                               torch.tensor([math.cos(2), math.cos(2 * w1), math.sin(2), math.sin(2 * w1),
                                             math.cos(4), math.cos(4 * w1), math.sin(4), math.sin(4 * w1)]))
    with pytest.raises(ValueError, match="divisible by 4"):
        spatial_position_embedding(2, 2, 6)


def test_position_embedding_and_pooled_conditioning_change_the_output():
    torch.manual_seed(0)
    base = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
                context_dim=6, num_groups=4)
    plain = UNet(UNetConfig(**base))
    torch.nn.init.normal_(plain.conv_out.weight, std=0.1)
    with_pos = UNet(UNetConfig(**base, position_embedding=True))
    with_pos.load_state_dict(plain.state_dict())
    pooled = UNet(UNetConfig(**base, pooled_dim=5))
    pooled.load_state_dict(plain.state_dict(), strict=False)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 6), torch.tensor([10.0, 500.0])
    p = torch.randn(2, 5)
    with torch.no_grad():
        assert not torch.allclose(with_pos(x, t, C(ctx)), plain(x, t, C(ctx)))
        a, b = pooled(x, t, C(ctx, pooled=p)), pooled(x, t, C(ctx, pooled=p.flip(0)))
        assert not torch.allclose(a[0], b[0])
        torch.testing.assert_close(pooled(x[:1], t[:1], C(ctx[:1], pooled=p[:1])), a[:1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cond.pooled must be"):
        pooled(x, t, C(ctx))
    with pytest.raises(ValueError, match="no pooled_dim"):
        plain(x, t, C(ctx, pooled=p))
