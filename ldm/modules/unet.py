"""The Latent Diffusion cross-attention U-Net denoiser (Rombach et al. 2022, sec. 3.3, eq. 3).

``UNet(config)(x, t, cond)`` predicts eps (or v / x0, whatever it is trained for) for latents ``x``
(B, C, H, W) at (possibly fractional) timesteps ``t`` (B,) conditioned on ``cond`` (an
``ldm.conditioning.Conditioning``: text tokens (B, L, D), their mask, an optional pooled embedding).
The layout is the ADM/LDM U-Net (Ho et al. 2020 appendix B, Dhariwal & Nichol 2021):

    conv_in -> [ResBlock (+ SpatialTransformer)] x num_res_blocks, Downsample     per level (encoder)
            -> ResBlock, SpatialTransformer, ResBlock                            (middle)
            -> [concat skip, ResBlock (+ SpatialTransformer)] x (num_res_blocks+1), Upsample  per level
            -> GroupNorm, SiLU, conv_out (zero-initialised)

Every ResBlock adds a projection of the timestep embedding. ``UNetConfig.sd15()`` is the released
Stable Diffusion v1.5 geometry (859,520,964 parameters); ``ldm.interop.diffusers_unet`` converts weights
to and from diffusers' ``UNet2DConditionModel`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.conditioning import Conditioning
from ldm.modules.attention import SpatialTransformer
from ldm.modules.context_refiner import ContextRefiner
from ldm.modules.denoiser import check_inputs, guidance_features
from ldm.modules.embeddings import PooledTextEmbedding, TimestepEmbedding, spatial_position_embedding
from ldm.modules.micro import ExtraConditionEmbedding
from ldm.modules.reuse import reused


@dataclass
class UNetConfig:
    """Geometry of the U-Net. Defaults are Stable Diffusion 1.5 (see :meth:`sd15`).

    Heads are set by exactly one of ``num_heads`` (same count at every level, SD 1.x style) or
    ``head_dim`` (channels per head; count grows with width, SD 2.x style); set the other to None.
    ``attention_resolutions`` are the *downsampling factors* (1 = the latent's own resolution,
    2 = one level down, ...) whose levels get a SpatialTransformer after each ResBlock; the middle
    block always has one.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int | None = 8
    head_dim: int | None = None
    transformer_depth: int = 1
    ff_mult: int = 4                   # GEGLU feed-forward inner width / channels (SD: 4)
    context_dim: int = 768
    dropout: float = 0.0
    num_groups: int = 32
    gradient_checkpointing: bool = False
    position_embedding: bool = False   # add fixed 2-D sin-cos features to conv_in's output (not in SD)
    pooled_dim: int | None = None      # width of the pooled text embedding added to the time embedding (None: off)
    scale_shift_norm: bool = False     # ADM's AdaGN: the embedding scales and shifts norm2 (False: adds, as SD)
    # scalar conditions from cond.extras added to the time embedding, {name: count} (ldm.modules.micro; SDXL's
    # size/crop micro-conditioning is {original_size: 2, crop_coords: 2, target_size: 2}); None: off
    extra_conditions: dict[str, int] | None = None
    guidance_embed_dim: int | None = None  # w-conditioning: cond.extras["guidance_scale"] joins the time embedding
    # bidirectional transformer layers over cond.tokens, trained with the denoiser, before every cross-attention
    # reads them (ldm.modules.context_refiner; not in SD); 0: off
    context_refiner_layers: int = 0

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if self.extra_conditions is not None:
            self.extra_conditions = {str(k): int(v) for k, v in dict(self.extra_conditions).items()} or None
        self.attention_resolutions = tuple(sorted({int(r) for r in self.attention_resolutions}, reverse=True))
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(f"UNetConfig: set exactly one of num_heads or head_dim (got num_heads={self.num_heads}, "
                             f"head_dim={self.head_dim}); set the other to null")
        if self.guidance_embed_dim is not None and self.guidance_embed_dim < 4:
            raise ValueError(f"UNetConfig: guidance_embed_dim must be >= 4 (or null), got {self.guidance_embed_dim}")
        if not self.channel_mult or min(self.num_res_blocks, self.transformer_depth, self.ff_mult) < 1:
            raise ValueError("UNetConfig: channel_mult must be non-empty, num_res_blocks, transformer_depth and "
                             "ff_mult >= 1")
        if self.context_refiner_layers < 0:
            raise ValueError(f"UNetConfig: context_refiner_layers must be >= 0, got {self.context_refiner_layers}")
        if self.context_refiner_layers and self.context_dim % (self.head_dim or self.num_heads):
            raise ValueError(f"UNetConfig: the context refiner's {self.context_dim}-d tokens do not split into heads "
                             f"of {'head_dim' if self.head_dim else 'num_heads'}={self.head_dim or self.num_heads}")
        factors = {2**i for i in range(len(self.channel_mult))}
        bad = sorted(set(self.attention_resolutions) - factors)
        if bad:
            raise ValueError(f"UNetConfig: attention_resolutions {bad} are not downsampling factors of this U-Net; "
                             f"use values from {sorted(factors)} (1 = full latent resolution)")
        for width in self.level_channels:
            if width % self.num_groups:
                raise ValueError(f"UNetConfig: {width} channels are not divisible by num_groups={self.num_groups}; "
                                 "change model_channels, channel_mult or num_groups")
            if width % (self.head_dim or self.num_heads):
                raise ValueError(f"UNetConfig: {width} channels do not split into heads of "
                                 f"{'head_dim' if self.head_dim else 'num_heads'}={self.head_dim or self.num_heads}")

    @property
    def level_channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def heads_for(self, channels: int) -> int:
        """Number of attention heads of a SpatialTransformer with ``channels`` channels."""
        return self.num_heads if self.num_heads is not None else channels // self.head_dim

    @classmethod
    def sd15(cls, **overrides) -> "UNetConfig":
        """Stable Diffusion v1.5 (the released LDM text-to-image config): 320 ch, mult 1,2,4,4,
        attention at 4,2,1, 8 heads, 768-d text tokens."""
        return cls(**{**dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                             num_res_blocks=2, attention_resolutions=(4, 2, 1), num_heads=8, head_dim=None,
                             transformer_depth=1, context_dim=768, dropout=0.0, num_groups=32), **overrides})

    @classmethod
    def shapes(cls, **overrides) -> "UNetConfig":
        """Small U-Net for 8x8x4 latents of 32 px shapes images: 48-96 ch, attention at 8x8 and 4x4, AdaGN
        ResBlocks, 3 channels per norm group (3.7 M params; configs/ldm/shapes.yaml adds the position and
        pooled-text features). One channel per group (GroupNorm(32) on 32 channels, an instance norm)
        needed about 2x the steps for the same validation loss in our ablations."""
        return cls(**{**dict(in_channels=4, out_channels=4, model_channels=48, channel_mult=(1, 2, 2),
                             num_res_blocks=1, attention_resolutions=(1, 2), num_heads=None, head_dim=16,
                             transformer_depth=1, context_dim=256, dropout=0.0, num_groups=16,
                             scale_shift_norm=True), **overrides})


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + timestep projection, GroupNorm-SiLU-dropout-conv, + (1x1-projected) input (ADM).

    With ``scale_shift_norm`` the embedding enters as AdaGN instead of a sum (Dhariwal & Nichol 2021, sec. 3:
    ``AdaGN(h, y) = y_s · GroupNorm(h) + y_b``, with ``y_s = 1 + scale`` so a zero projection is the identity).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0, num_groups: int = 32,
                 scale_shift_norm: bool = False):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.scale_shift_norm = scale_shift_norm
        self.time_proj = nn.Linear(emb_dim, 2 * out_channels if scale_shift_norm else out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``emb`` is SiLU(time embedding), shared by every block (computed once per forward)."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.scale_shift_norm:
            scale, shift = self.time_proj(emb)[:, :, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + self.time_proj(emb)[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """3x3 convolution with stride 2 (halves H and W, rounding up)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the matching skip's size (2x for even sizes), then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResBlocks, each followed by a SpatialTransformer when
    the level has attention (``attn`` is None otherwise), then an optional resampler."""

    def __init__(self, in_channels: list[int], channels: int, config: UNetConfig, attention: bool,
                 resample: nn.Module | None):
        super().__init__()
        emb_dim = 4 * config.model_channels
        self.res = nn.ModuleList(
            ResBlock(c, channels, emb_dim, config.dropout, config.num_groups, config.scale_shift_norm)
            for c in in_channels)
        self.attn = nn.ModuleList(
            SpatialTransformer(channels, config.context_dim, config.heads_for(channels), config.transformer_depth,
                               config.num_groups, config.ff_mult)
            for _ in in_channels) if attention else None
        self.resample = resample


class MidBlock(nn.Module):
    """ResBlock, SpatialTransformer, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        emb_dim = 4 * config.model_channels
        self.res = nn.ModuleList(ResBlock(channels, channels, emb_dim, config.dropout, config.num_groups,
                                          config.scale_shift_norm) for _ in range(2))
        self.attn = SpatialTransformer(channels, config.context_dim, config.heads_for(channels),
                                       config.transformer_depth, config.num_groups, config.ff_mult)


class UNet(nn.Module):
    """Cross-attention U-Net ``eps_theta(z_t, t, tau(y))`` of LDM eq. 3; output has the shape of ``x``."""

    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        mc, widths, nrb = config.model_channels, config.level_channels, config.num_res_blocks
        self.conv_in = nn.Conv2d(config.in_channels, mc, 3, padding=1)
        self.time_embed = TimestepEmbedding(mc, 4 * mc, config.guidance_embed_dim)
        self.pooled_embed = PooledTextEmbedding(config.pooled_dim, 4 * mc) if config.pooled_dim else None
        self.extra_embed = (ExtraConditionEmbedding(config.extra_conditions, 4 * mc)
                            if config.extra_conditions else None)
        self.context_refiner = (ContextRefiner(config.context_dim, config.context_refiner_layers,
                                               config.heads_for(config.context_dim))
                                if config.context_refiner_layers else None)

        skip_channels = [mc]  # channels of every tensor the encoder hands to the decoder, in order
        ch = mc
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            level = Level([ch] + [width] * (nrb - 1), width, config, 2**i in config.attention_resolutions,
                          None if last else Downsample(width))
            self.down.append(level)
            ch = width
            skip_channels += [width] * nrb + ([] if last else [width])

        self.mid = MidBlock(ch, config)

        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            in_channels = []
            for _ in range(nrb + 1):
                in_channels.append(ch + skip_channels.pop())
                ch = width
            self.up.append(Level(in_channels, width, config, 2**i in config.attention_resolutions,
                                 Upsample(width) if i > 0 else None))

        self.norm_out = nn.GroupNorm(config.num_groups, mc)
        self.conv_out = nn.Conv2d(mc, config.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _block(self, block: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        """Denoiser output for latents ``x`` (B,C,H,W) at timesteps ``t`` (B,) given ``cond`` (the denoiser protocol).

        ``cond.tokens`` (B, L, D) are cross-attended; padding tokens (``cond.mask`` False) are ignored by every
        cross-attention (LDM sec. 3.3, keys/values restricted to the kept tokens). ``cond.pooled``
        (B, pooled_dim) joins the time embedding; required iff ``config.pooled_dim`` is set, and so do the
        ``cond.extras`` named by ``config.extra_conditions`` (SDXL's size/crop micro-conditioning). With
        ``config.guidance_embed_dim`` the CFG scale ``cond.extras["guidance_scale"]`` (B,) joins it too (w-conditioning,
        Meng et al. 2023), through a zero-initialised projection. With ``config.context_refiner_layers`` the tokens
        pass through a :class:`~ldm.modules.context_refiner.ContextRefiner` first.
        """
        t, attn_mask = check_inputs("UNet", self.config, x, t, cond)
        context = cond.tokens
        if self.context_refiner is not None:  # refined once per call (once per sampling run: ldm.modules.reuse)
            context = reused(self.context_refiner, (context, cond.mask),
                             lambda: self.context_refiner(cond.tokens, attn_mask))
        emb = self.time_embed(t, guidance_features("UNet", self.config, cond, x))
        if self.pooled_embed is not None:
            emb = emb + self.pooled_embed(cond.pooled)
        if self.extra_embed is not None:  # SDXL micro-conditioning: zero-initialised, so it starts as a no-op
            emb = emb + self.extra_embed(cond.extras, x.shape[0]).to(emb.dtype)
        emb = F.silu(emb)  # every ResBlock projects SiLU(emb): compute it once
        h = self.conv_in(x)
        if self.config.position_embedding:  # lets cross-attention queries know where they are (e.g. "top left")
            h = h + spatial_position_embedding(h.shape[2], h.shape[3], h.shape[1], device=h.device).to(h.dtype)
        skips = [h]
        for level in self.down:
            for i, res in enumerate(level.res):
                h = self._block(res, h, emb)
                if level.attn is not None:
                    h = self._block(level.attn[i], h, context, attn_mask)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self._block(self.mid.res[0], h, emb)
        h = self._block(self.mid.attn, h, context, attn_mask)
        h = self._block(self.mid.res[1], h, emb)

        for level in self.up:
            for i, res in enumerate(level.res):
                h = self._block(res, torch.cat([h, skips.pop()], dim=1), emb)
                if level.attn is not None:
                    h = self._block(level.attn[i], h, context, attn_mask)
            if level.resample is not None:
                h = level.resample(h, skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))
