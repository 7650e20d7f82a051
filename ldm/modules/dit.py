"""The Diffusion Transformer denoiser (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), with
cross-attention to text tokens so it is a drop-in beside the U-Net on the denoiser protocol.

``DiT(config)(x, t, cond)``, for latents ``x`` (B, C, I, I) with I = ``input_size``:

    patchify (p x p patches -> T = (I/p)^2 tokens, a linear embedding; ViT eq. 1, DiT sec. 3.1 "Patchify")
    + 2-D sin-cos (MAE; DiT sec. 3.1) or learned (ViT eq. 1) position embeddings
    -> depth x DiTBlock                                              (DiT sec. 3.1, Fig. 3)
    -> final adaLN (LayerNorm, shift/scale from c) + linear to p*p*out_channels (zero-initialised)
    -> unpatchify to (B, out_channels, I, I)

Each DiTBlock is [adaLN-Zero self-attention, cross-attention to ``cond.tokens``, adaLN-Zero MLP]: the
conditioning vector c regresses a shift γ/β and a gate α per residual branch,
``x + α · f(LN(x) · (1 + γ) + β)`` (DiT sec. 3.2 "adaLN-Zero block"; the modulation is zero-initialised so every
block starts as the identity). The cross-attention between the two, pre-LayerNorm with a zero-initialised output
projection, is PixArt-α's text injection (Chen et al. 2023, sec. 2.3, Fig. 4); the mask drops padding tokens.

c = timestep embedding (DiT sec. 3.2; the sinusoid of ``ldm.modules.embeddings``, 256 frequencies, then an MLP)
+ the pooled text embedding when ``pooled_dim`` is set (GLIDE sec. 2.3) + a class-label embedding when
``num_classes`` is set (the paper's ImageNet configuration; label ``num_classes`` is the null class of
classifier-free guidance, DiT sec. 3.1 "Classifier-free guidance"). ``out_channels = 2 * in_channels`` adds the
learned-variance half of the output (Nichol & Dhariwal 2021, eq. 15; DiT sec. 3.1).

Presets ``DiTConfig.preset("DiT-XL/2")`` are the paper's Table 1 (S/B/L/XL: depth 12/12/24/28, width
384/768/1024/1152, heads 6/12/16/16, MLP ratio 4) x patch 2/4/8; ``DiTConfig.paper(name)`` adds the
class-conditional ImageNet-256 head (DiT-XL/2: 675 M parameters) and ``DiT-shapes{-XS,-S,}/p`` are sized for the 8x8x4
latents of the shapes data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.conditioning import Conditioning
from ldm.modules.attention import Attention
from ldm.modules.denoiser import check_inputs, guidance_features
from ldm.modules.embeddings import PooledTextEmbedding, TimestepEmbedding, spatial_position_embedding

# depth, hidden size, heads: DiT Table 1, and three for the 8x8x4 latents of the shapes data (not in the paper;
# DiT-shapes/2 with 64-d tokens and 128-d pooled text has the shapes U-Net's parameter count, 3.58 M vs 3.54 M)
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
    "shapes-XS": (3, 96, 3), "shapes-S": (4, 128, 4), "shapes": (5, 180, 6),
}
POSITION_EMBEDDINGS = ("sincos", "learned")


@dataclass
class DiTConfig:
    """Geometry and conditioning of a DiT (defaults: DiT-XL/2 on SD-sized 32x32x4 latents, text-conditioned)."""

    in_channels: int = 4
    out_channels: int = 4              # 2 * in_channels: the learned-variance output (DiT sec. 3.1)
    context_dim: int = 768             # width of cond.tokens (cross-attended when cross_attention)
    pooled_dim: int | None = None      # width of the pooled text embedding added to c (None: off)
    input_size: int = 32               # latent height = width; LatentDiffusion sets it to resolution / vae factor
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    position_embedding: str = "sincos"  # "sincos" (fixed, the paper's) or "learned"
    cross_attention: bool = True       # attend to cond.tokens in every block (False: the paper's class-only DiT)
    num_classes: int | None = None     # class-conditional: c += embedding of cond.extras["label"] (ImageNet: 1000)
    guidance_embed_dim: int | None = None  # w-conditioning: cond.extras["guidance_scale"] joins c (LCM students)
    qkv_bias: bool = True              # biases on the self-attention Q, K, V projections (ViT / DiT)
    frequency_dim: int = 256           # sinusoidal timestep features fed to the timestep MLP (DiT code)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(f"DiTConfig: out_channels={self.out_channels} must be in_channels={self.in_channels} or "
                             f"2 x in_channels (learned variance)")
        if self.patch_size < 1 or self.input_size < 1 or self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig: input_size={self.input_size} is not divisible by patch_size="
                             f"{self.patch_size}; pick a patch size that divides the latent size")
        if min(self.depth, self.num_heads, self.hidden_size) < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig: hidden_size={self.hidden_size} does not split into num_heads="
                             f"{self.num_heads} heads")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"DiTConfig: position_embedding={self.position_embedding!r}; use one of "
                             f"{list(POSITION_EMBEDDINGS)}")
        if self.position_embedding == "sincos" and self.hidden_size % 4:
            raise ValueError(f"DiTConfig: sin-cos positions need hidden_size divisible by 4, got {self.hidden_size}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"DiTConfig: num_classes must be >= 1 or null, got {self.num_classes}")
        if self.guidance_embed_dim is not None and self.guidance_embed_dim < 4:
            raise ValueError(f"DiTConfig: guidance_embed_dim must be >= 4 (or null), got {self.guidance_embed_dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig: mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def grid_size(self) -> int:
        """Patches per side: input_size / patch_size."""
        return self.input_size // self.patch_size

    @classmethod
    def preset(cls, name: str, **overrides) -> DiTConfig:
        """``"DiT-{S,B,L,XL}/{p}"`` (DiT Table 1 at patch size p) or ``"DiT-shapes{-XS,-S,}/{p}"``; ``overrides``
        set any other field (channels, input_size, conditioning)."""
        match = re.fullmatch(r"DiT-([\w-]+)/(\d+)", name)
        if match is None or match.group(1) not in SIZES:
            raise ValueError(f"unknown DiT preset {name!r}; use DiT-<size>/<patch> with size in {list(SIZES)}")
        depth, hidden, heads = SIZES[match.group(1)]
        return cls(**{**dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(match.group(2))),
                      **overrides})

    @classmethod
    def paper(cls, name: str, **overrides) -> DiTConfig:
        """The paper's class-conditional ImageNet 256x256 model: 32x32x4 latents, 1000 classes, learned variance,
        no text (DiT sec. 4)."""
        return cls.preset(name, **{**dict(in_channels=4, out_channels=8, input_size=32, num_classes=1000,
                                          cross_attention=False, pooled_dim=None), **overrides})


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C): non-overlapping p x p patches in row-major order, each flattened
    as (row in patch, column in patch, channel) (ViT eq. 1's x_p; DiT sec. 3.1)."""
    b, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: a {h}x{w} input does not split into {p}x{p} patches")
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, (H/p)(W/p), p*p*C) -> (B, C, H, W): the inverse of :func:`patchify`."""
    b, n, d = tokens.shape
    p = patch_size
    h, w = height // p, width // p
    if n != h * w or d % (p * p):
        raise ValueError(f"unpatchify: {n} tokens of {d} features are not {h}x{w} patches of {p}x{p}xC")
    c = d // (p * p)
    return tokens.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x · (1 + scale) + shift`` (adaLN, DiT sec. 3.2; ``1 +`` so zero modulation is the identity)."""
    return torch.addcmul(shift, x, 1 + scale)


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``, inner width ``hidden``: the ViT/DiT point-wise feed-forward."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, (optional) cross-attention to the text tokens, adaLN-Zero MLP (DiT Fig. 3;
    PixArt-α sec. 2.3). ``forward(x, c_act, context, mask)`` takes ``c_act = SiLU(c)``, computed once per DiT."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, context_dim: int | None, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads, qkv_bias=qkv_bias)
        self.norm_cross = nn.LayerNorm(hidden, eps=1e-6) if context_dim else None
        self.cross_attn = Attention(hidden, num_heads, context_dim) if context_dim else None
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.modulation = nn.Linear(hidden, 6 * hidden)  # -> β1, γ1, α1, β2, γ2, α2

    def forward(self, x: torch.Tensor, c_act: torch.Tensor, context: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c_act)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, attn_mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) then a linear map of each token to its p*p*out_channels patch (DiT sec. 3.1)."""

    def __init__(self, hidden: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, patch_dim)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c_act)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer ``eps_theta(z_t, t, cond)`` (see the module docstring); output (B, out_channels, I, I)."""

    config_class = DiTConfig

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        cfg, hidden = config, config.hidden_size
        self.patch_embed = nn.Linear(cfg.patch_size ** 2 * cfg.in_channels, hidden)
        tokens = cfg.grid_size ** 2
        if cfg.position_embedding == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, hidden))
        else:  # fixed: not a parameter and not in the state dict; computed on the CPU even under a meta device
            pos = spatial_position_embedding(cfg.grid_size, cfg.grid_size, hidden, device=torch.device("cpu"))
            self.register_buffer("pos_embed", pos.flatten(1).T[None].contiguous(), persistent=False)
        self.time_embed = TimestepEmbedding(cfg.frequency_dim, hidden, cfg.guidance_embed_dim)
        self.pooled_embed = PooledTextEmbedding(cfg.pooled_dim, hidden) if cfg.pooled_dim else None
        # one extra row: the null label of classifier-free guidance (DiT sec. 3.1)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, hidden) if cfg.num_classes else None
        context_dim = cfg.context_dim if cfg.cross_attention else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, cfg.num_heads, cfg.mlp_ratio, context_dim, cfg.qkv_bias)
                                    for _ in range(cfg.depth))
        self.final = FinalLayer(hidden, cfg.patch_size ** 2 * cfg.out_channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The DiT initialisation: Xavier-uniform linears with zero biases, N(0, 0.02) timestep MLP, label table and
        learned positions; adaLN-Zero modulations, the output linear (DiT sec. 3.2) and the cross-attention
        output (PixArt-α sec. 2.3) zero, so the network starts as x -> 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for linear in (self.time_embed.linear_1, self.time_embed.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        zero = [self.final.modulation, self.final.linear]
        if self.time_embed.cond_proj is not None:  # the w embedding starts at zero (LCM's time_cond_proj)
            zero.append(self.time_embed.cond_proj)
        for block in self.blocks:
            zero.append(block.modulation)
            if block.cross_attn is not None:
                zero.append(block.cross_attn.out)
        for linear in zero:
            nn.init.zeros_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def conditioning_vector(self, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """c = time embedding (with the guidance-scale features when ``guidance_embed_dim`` is set) (+ pooled text
        embedding) (+ label embedding), (B, hidden_size)."""
        c = self.time_embed(t, guidance_features("DiT", self.config, cond, t))
        if self.pooled_embed is not None:
            c = c + self.pooled_embed(cond.pooled)
        if self.label_embed is not None:
            labels = cond.extras.get("label")
            if labels is None or labels.shape != t.shape or labels.is_floating_point():
                raise ValueError(f"DiT: this DiT is class-conditional (num_classes={self.config.num_classes}): "
                                 "cond.extras['label'] must be a (B,) integer tensor (num_classes = the null class)")
            c = c + self.label_embed(labels.to(c.device))
        return c

    def _block(self, block: nn.Module, *args) -> torch.Tensor:
        if self.config.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        """Denoiser output for latents ``x`` (B, C, I, I) at timesteps ``t`` (B,) given ``cond`` (denoiser protocol).

        ``cond.tokens`` are cross-attended in every block (padding, ``cond.mask`` False, is never attended to);
        ``cond.pooled`` joins c iff ``pooled_dim`` is set; ``cond.extras["label"]`` iff ``num_classes`` is set;
        ``cond.extras["guidance_scale"]`` (B,) iff ``guidance_embed_dim`` is set (w-conditioning, Meng et al. 2023).
        """
        cfg = self.config
        t, attn_mask = check_inputs("DiT", cfg, x, t, cond)
        if x.shape[-2:] != (cfg.input_size, cfg.input_size):
            raise ValueError(f"DiT: latents are {x.shape[-2]}x{x.shape[-1]} but this DiT is built for "
                             f"{cfg.input_size}x{cfg.input_size} (input_size): sample at the training resolution")
        c_act = F.silu(self.conditioning_vector(t, cond))  # every modulation reads SiLU(c): once per forward
        h = self.patch_embed(patchify(x, cfg.patch_size)) + self.pos_embed.to(x.device, x.dtype)
        context = cond.tokens if cfg.cross_attention else None
        for block in self.blocks:
            h = self._block(block, h, c_act, context, attn_mask)
        return unpatchify(self.final(h, c_act), cfg.patch_size, cfg.input_size, cfg.input_size)
