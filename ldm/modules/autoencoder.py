"""The KL-regularized autoencoder of Latent Diffusion: image x <-> latent z, f = patch_size * 2^(len(ch_mult)-1).

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022), Sec. 3.1
and appendix G: a convolutional encoder E and decoder D built from ResNet blocks (GroupNorm + SiLU,
He et al. 2016), strided-conv downsampling / nearest-neighbour + conv upsampling, a middle block
with single-head self-attention, and a diagonal-Gaussian posterior q(z|x) (KL-reg). The Stable
Diffusion "kl-f8" VAE is ``AutoencoderKLConfig(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2,
z_channels=4)``.

``patch_size`` p > 1 wraps the conv stack in a space-to-depth / depth-to-space pair (pixel unshuffle at the
encoder's input, pixel shuffle at the decoder's output, as in the "space-to-channel" autoencoders of
Chen et al. 2024, DC-AE): the full-resolution level, the most expensive one on a CPU, is replaced by
p² channels, and the downsampling factor becomes f = p * 2^(len(ch_mult)-1).

The part also owns its latent normalization: ``encode_latents(x) = (z - shift_factor) * scaling_factor``
and ``decode_latents`` inverts it, with both constants measured at export (see
``ldm.models.autoencoder.latent_scale_and_shift``) and stored in config.json, so no other code
knows them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.distributions import DiagonalGaussian

NORM_EPS = 1e-6


@dataclass
class AutoencoderKLConfig:
    """Geometry of the encoder/decoder plus the latent normalization measured at export."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128                      # width of the first level
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # width multiplier per level
    num_res_blocks: int = 2            # ResNet blocks per encoder level (decoder uses one more)
    attn_resolutions: list[int] = field(default_factory=list)  # feature sizes that get self-attention
    mid_attention: bool = True         # self-attention in the middle blocks
    resolution: int = 256              # nominal image size; only used to place attn_resolutions
    z_channels: int = 4
    double_z: bool = True              # encoder predicts mean and logvar (False: deterministic)
    norm_groups: int = 32
    dropout: float = 0.0
    patch_size: int = 1                # pixel (un)shuffle factor around the conv stack (1 = LDM as published)
    scaling_factor: float = 1.0        # 1 / std of the training latents (set at export)
    shift_factor: float = 0.0          # mean of the training latents (set at export)

    def __post_init__(self) -> None:
        self.ch_mult = [int(m) for m in self.ch_mult]
        self.attn_resolutions = [int(r) for r in self.attn_resolutions]
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1 (a block changes the width), got {self.num_res_blocks}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(f"widths {bad} (ch * ch_mult) are not divisible by norm_groups={self.norm_groups}; "
                             "change ch, ch_mult or norm_groups")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.ch_mult) - 1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))) with a 1x1 shortcut when the width changes (He et al. 2016)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, residual (Vaswani et al. 2017, eq. 1)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (lin(t).unsqueeze(1) for lin in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(QK^T / sqrt(C)) V
        return x + self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after padding right/bottom by one (as in LDM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNet blocks (each optionally followed by attention), then a resampler."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attention: bool, resample: nn.Module | None,
                 groups: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, dropout) for i in range(n_blocks)])
        self.attns = nn.ModuleList([SelfAttention(out_ch, groups) for _ in range(n_blocks)]) if attention else None
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.attns is not None:
                x = self.attns[i](x)
        return self.resample(x) if self.resample is not None else x


class MidBlock(nn.Module):
    """ResNet block, self-attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, attention: bool, groups: int, dropout: float) -> None:
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn = SelfAttention(channels, groups) if attention else None
        self.block2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.block2(x)


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> posterior parameters (B, 2*z_channels or z_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.patch_size = cfg.patch_size
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch_size**2, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch, res = cfg.ch, cfg.resolution // cfg.patch_size
        for i, out_ch in enumerate(widths):
            last = i == len(widths) - 1
            self.down.append(Level(in_ch, out_ch, cfg.num_res_blocks, res in cfg.attn_resolutions,
                                   None if last else Downsample(out_ch), g, cfg.dropout))
            in_ch, res = out_ch, res if last else res // 2
        self.mid = MidBlock(in_ch, cfg.mid_attention, g, cfg.dropout)
        self.norm_out = group_norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, (2 if cfg.double_z else 1) * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(F.pixel_unshuffle(x, self.patch_size) if self.patch_size > 1 else x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> image (B, out_channels, h*f, w*f); levels run deepest first."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        in_ch = widths[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = MidBlock(in_ch, cfg.mid_attention, g, cfg.dropout)
        self.up = nn.ModuleList()
        for i, out_ch in reversed(list(enumerate(widths))):
            self.up.append(Level(in_ch, out_ch, cfg.num_res_blocks + 1, res in cfg.attn_resolutions,
                                 Upsample(out_ch) if i > 0 else None, g, cfg.dropout))
            in_ch, res = out_ch, res * 2 if i > 0 else res
        self.norm_out = group_norm(in_ch, g)
        self.patch_size = cfg.patch_size
        self.conv_out = nn.Conv2d(in_ch, cfg.out_channels * cfg.patch_size**2, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(h, self.patch_size) if self.patch_size > 1 else h


INFERENCE_CHANNELS_LAST = True  # a switch for the on/off benchmark (``ldm bench --only fastpath``)


def inference_layout(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``run(x)``; on a CPU without autograd, with ``x`` in channels_last (NHWC) memory, oneDNN's faster layout for
    small 3x3 convolutions (encode 1.14x, decode 1.13-1.19x at the shapes geometry, SD's kl-f8 unchanged:
    docs/results/bench.md), the result handed back contiguous (NCHW). The same function; only the order of the
    sums differs (float rounding, ~1e-6)."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or not INFERENCE_CHANNELS_LAST:
        return run(x)
    return run(x.contiguous(memory_format=torch.channels_last)).contiguous()


class AutoencoderKL(nn.Module):
    """The exportable VAE part: ``encode`` -> DiagonalGaussian, ``decode``, and the scaled-latent API."""

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        zc = config.z_channels
        self.quant_conv = nn.Conv2d((2 if config.double_z else 1) * zc, (2 if config.double_z else 1) * zc, 1)
        self.post_quant_conv = nn.Conv2d(zc, zc, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv (for the adaptive GAN weight, Esser et al. 2021 eq. 7)."""
        return self.decoder.conv_out.weight

    def check_images(self, x: torch.Tensor) -> None:
        """Raise a ValueError that says what is wrong with an image batch, if anything."""
        c, f = self.config.in_channels, self.downsample_factor
        if x.dim() != 4:
            raise ValueError(f"expected images shaped (B, {c}, H, W), got a {x.dim()}-d tensor {tuple(x.shape)}")
        if x.shape[1] != c:
            raise ValueError(f"expected {c}-channel images (B, {c}, H, W), got {x.shape[1]} channels "
                             f"{tuple(x.shape)}; convert the images (e.g. to RGB) or set in_channels")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the downsampling "
                             f"factor {f}; resize/crop the images (e.g. the data `resolution`) to a multiple of {f}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for images in [-1, 1] (Rombach et al. 2022, Sec. 3.1: z = E(x))."""
        self.check_images(x)
        moments = inference_layout(lambda h: self.quant_conv(self.encoder(h)), x)
        if self.config.double_z:
            return DiagonalGaussian.from_parameters(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x_hat = D(z) for unscaled latents (Rombach et al. 2022, Sec. 3.1)."""
        zc = self.config.z_channels
        if z.dim() != 4 or z.shape[1] != zc:
            raise ValueError(f"expected latents shaped (B, {zc}, h, w), got {tuple(z.shape)}")
        return inference_layout(lambda h: self.decoder(self.post_quant_conv(h)), z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct: (D(z), q(z|x)) with z sampled (reparameterized) or the posterior mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion-space latents (z - shift_factor) * scaling_factor, unit variance on training data."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Images from diffusion-space latents: D(z / scaling_factor + shift_factor)."""
        return self.decode(z / self.config.scaling_factor + self.config.shift_factor)
