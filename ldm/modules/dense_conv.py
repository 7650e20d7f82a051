"""A convolution on a map so small that every output sees every input: one matrix product per call.

A 2-D convolution is linear in its input: on a C_in x H x W map it is the matrix M of shape
(C_out·H_o·W_o, C_in·H·W) with ``M[(o, p), (i, q)] = w[o, i, tap(p, q)]``, zero where no tap of the kernel joins
input position q to output position p (the doubly block-Toeplitz matrix of the convolution; Goodfellow, Bengio &
Courville 2016, *Deep Learning*, sec. 9.1). When no entry of M is zero by construction (a 3x3 kernel with padding 1
on a 2x2 map: each output sees all four inputs), ``y = M x + b`` does exactly the multiply-adds the convolution
does, as one GEMM on the NCHW tensor's free (B, C_in·H·W) view and a free view back, without the per-call layout
work of a direct convolution on a tiny map (here 2.5-3x faster for 96-192 channels at batch 16-32).

Building M reads the weights once more (16/9 of them for a 3x3 kernel on 2x2), which costs what it saves, so the
matrix product is used only where M is kept: inside a sampling run's reuse scope (``ldm.modules.reuse``: no
autograd, weights fixed), once per layer and run. Elsewhere (training, a single call) :class:`Conv2d` is
``nn.Conv2d``; its parameters and state dict are ``nn.Conv2d``'s in every case.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.reuse import keeping, reused


@functools.lru_cache(maxsize=64)
def tap_index(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
              ) -> tuple[torch.Tensor, int, int]:
    """For each (output position p, input position q), row-major, the kernel tap ``ky * kw + kx`` joining them, or
    ``kh * kw`` where none does; and the output height and width."""
    (kh, kw), (sy, sx), (py, px) = kernel, stride, padding
    out_h, out_w = (height + 2 * py - kh) // sy + 1, (width + 2 * px - kw) // sx + 1
    index = torch.full((out_h * out_w, height * width), kh * kw, dtype=torch.long)
    for oy in range(out_h):
        for ox in range(out_w):
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = oy * sy - py + ky, ox * sx - px + kx
                    if 0 <= iy < height and 0 <= ix < width:
                        index[oy * out_w + ox, iy * width + ix] = ky * kw + kx
    return index, out_h, out_w


def fully_dense(conv: nn.Conv2d, height: int, width: int) -> bool:
    """True when every output position of ``conv`` on a height x width map sees every input position (M has no
    structural zero), for an ungrouped, undilated, zero-padded convolution."""
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    return _covers(height, width, conv.kernel_size, conv.stride, conv.padding)


@functools.lru_cache(maxsize=64)
def _covers(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
            ) -> bool:
    index, _, _ = tap_index(height, width, kernel, stride, padding)
    return bool((index < kernel[0] * kernel[1]).all())


def conv_matrix(weight: torch.Tensor, height: int, width: int, stride: tuple[int, int], padding: tuple[int, int]
                ) -> tuple[torch.Tensor, int, int]:
    """M (C_out·H_o·W_o, C_in·H·W) of the convolution with ``weight`` (C_out, C_in, kh, kw) on a height x width
    map, and the output height and width: ``conv2d(x, weight).flatten(1) == x.flatten(1) @ M.T``."""
    c_out, c_in, kh, kw = weight.shape
    index, out_h, out_w = tap_index(height, width, (kh, kw), stride, padding)
    taps = torch.cat([weight.permute(2, 3, 0, 1).reshape(kh * kw, c_out * c_in), weight.new_zeros(1, c_out * c_in)])
    m = taps.index_select(0, index.flatten().to(weight.device)).view(out_h * out_w, height * width, c_out, c_in)
    return m.permute(2, 0, 3, 1).reshape(c_out * out_h * out_w, c_in * height * width), out_h, out_w


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that, inside a sampling run (:func:`ldm.modules.reuse.keeping`) on a map it covers whole
    (:func:`fully_dense`), runs as ``y = M x + b`` with M built once per run (:func:`conv_matrix`)."""

    dense = True  # a class switch, for the on/off benchmark (``ldm bench --only fastpath``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or not self.dense or x.dim() != 4 or not keeping():
            return super().forward(x)  # (compiled graphs fuse on their own and see no scope)
        height, width = x.shape[-2:]
        if not fully_dense(self, height, width):
            return super().forward(x)
        kept = reused(self, (self.weight, self.bias), lambda: self._matrix(x, height, width))
        if kept[0] != (height, width):  # another map size in the same run: build afresh, keep nothing
            kept = self._matrix(x, height, width)
        _, matrix, bias, out_h, out_w = kept
        return F.linear(x.reshape(x.shape[0], -1), matrix, bias).view(x.shape[0], self.out_channels, out_h, out_w)

    def _matrix(self, x: torch.Tensor, height: int, width: int
                ) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor | None, int, int]:
        matrix, out_h, out_w = conv_matrix(self.weight, height, width, self.stride, self.padding)
        bias = None if self.bias is None else self.bias.repeat_interleave(out_h * out_w)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        matrix = matrix.to(dtype)  # under autocast the GEMM runs in its dtype: cast once, not per call
        return (height, width), matrix, None if bias is None else bias.to(dtype), out_h, out_w
