"""Small-map convolutions as one matrix product (ldm.modules.dense_conv): the matrix is the convolution's, it is
used only where every output sees every input and only inside a sampling run, built once per run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.conditioning import Conditioning
from ldm.modules.dense_conv import Conv2d, conv_matrix, fully_dense
from ldm.modules.reuse import reuse_text_work
from ldm.modules.unet import UNet, UNetConfig


@pytest.mark.parametrize(("size", "kernel", "stride", "padding"),
                         [(2, 3, 1, 1), (4, 3, 1, 1), (5, 3, 2, 1), (3, 1, 1, 0), (4, 2, 2, 0), (1, 3, 1, 1)])
def test_conv_matrix_is_the_convolution(size: int, kernel: int, stride: int, padding: int):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 3, kernel, kernel, generator=g), torch.randn(4, 3, size, size, generator=g)
    matrix, out_h, out_w = conv_matrix(w, size, size, (stride, stride), (padding, padding))
    expected = F.conv2d(x, w, stride=stride, padding=padding)
    assert expected.shape[-2:] == (out_h, out_w)
    torch.testing.assert_close((x.flatten(1) @ matrix.T).view_as(expected), expected, atol=1e-5, rtol=1e-5)


def test_fully_dense_only_where_every_output_sees_every_input():
    three = torch.nn.Conv2d(4, 4, 3, padding=1)
    assert fully_dense(three, 2, 2) and fully_dense(three, 1, 1) and fully_dense(three, 1, 2)
    assert not fully_dense(three, 3, 3)  # a corner output sees 2x2 of the 3x3 inputs
    assert not fully_dense(torch.nn.Conv2d(4, 4, 1), 2, 2)  # 1x1: each output sees one input (3/4 zeros)
    assert not fully_dense(torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), 4, 4)
    assert not fully_dense(torch.nn.Conv2d(4, 4, 3, padding=1, groups=2), 2, 2)
    assert not fully_dense(torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 2, 2)


def _counted(conv: Conv2d) -> list[int]:
    built: list[int] = []
    make = conv._matrix
    conv._matrix = lambda *a: built.append(1) or make(*a)  # type: ignore[method-assign]
    return built


def test_conv2d_uses_the_matrix_once_per_sampling_run_and_only_there():
    torch.manual_seed(0)
    conv = Conv2d(6, 5, 3, padding=1)
    built = _counted(conv)
    x = torch.randn(3, 6, 2, 2)
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    with torch.no_grad():
        assert torch.equal(conv(x), expected)  # outside a run: the convolution itself
        with reuse_text_work():
            steps = [conv(x * s) for s in (1.0, 0.5, 0.25)]
            wide = conv(torch.randn(3, 6, 4, 4))  # a map it does not cover whole: the convolution
    assert built == [1]
    for s, got in zip((1.0, 0.5, 0.25), steps, strict=True):
        torch.testing.assert_close(got, F.conv2d(x * s, conv.weight, conv.bias, padding=1), atol=1e-5, rtol=1e-5)
    assert wide.shape == (3, 5, 4, 4)
    with reuse_text_work():  # autograd recording (training): never the kept matrix
        y = conv(x.requires_grad_())
    assert built == [1] and torch.equal(y, F.conv2d(x, conv.weight, conv.bias, padding=1))
    with torch.no_grad(), reuse_text_work(), torch.autocast("cpu", torch.bfloat16):
        low = conv(x)
    assert low.dtype == torch.bfloat16 and built == [1, 1]  # kept per autocast state, cast once
    torch.testing.assert_close(low.float(), expected, atol=0.05, rtol=0.05)


def test_unet_reaching_2x2_maps_samples_the_same_inside_a_run():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=8, channel_mult=(1, 2, 2),
                           num_res_blocks=1, attention_resolutions=(2,), num_heads=None, head_dim=4,
                           context_dim=12, num_groups=4)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    dense = [m for m in unet.modules() if isinstance(m, Conv2d)]
    built = [_counted(m) for m in dense]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5.0, 500.0])
    cond = Conditioning(torch.randn(2, 3, 12, generator=g), torch.ones(2, 3, dtype=torch.bool))
    with torch.inference_mode():
        plain = unet(x, t, cond)
        with reuse_text_work():
            kept = [unet(x, t, cond) for _ in range(2)]
    assert sum(len(b) for b in built) >= 3  # the 2x2 level's convolutions ran as matrices, each built once
    assert all(len(b) <= 1 for b in built)
    for k in kept:
        torch.testing.assert_close(k, plain, atol=1e-5, rtol=1e-4)
    assert plain.abs().max() > 0.05
