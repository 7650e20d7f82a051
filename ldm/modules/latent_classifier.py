"""A time-conditioned classifier on noisy latents: p_φ(y | z_t, t) for classifier guidance.

Dhariwal & Nichol 2021 (§4.1) train a classifier on noisy images x_t ~ q(x_t | x_0) (DDPM eq. 4) and guide an
unconditional diffusion model with its gradient ∇_{x_t} log p_φ(y | x_t). Here the images are VAE latents
z_t = α_t z_0 + σ_t ε, and ``y`` is any set of labels a dataset's json holds (one softmax head per label; for
shapes: colour, shape, position, size, background). The heads are treated as independent given z_t, so

    log p_φ(y | z_t) = Σ_a log p_φ(y_a | z_t)                                         (a over the labelled heads)

and an unknown label (index −1) adds nothing.

The trunk is a small version of their classifier (the U-Net's downsampling half, §4.1): conv_in, then per level
ADM ResBlocks with AdaGN time conditioning (their §3, ``ResBlock`` of ``ldm.modules.unet``) and a stride-2
downsample between levels; the final map is flattened (it keeps *where* things are, which a position label
needs; Dhariwal & Nichol pool with attention at 8×8 instead) into a hidden layer that all heads read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.embeddings import TimestepEmbedding
from ldm.modules.unet import Downsample, ResBlock


@dataclass
class LatentClassifierConfig:
    """Geometry and label vocabularies of a :class:`LatentClassifier`.

    ``labels`` maps each head's name to its class names (index i of the head is ``labels[name][i]``);
    ``resolution`` is the latent side the flattened head was built for.
    """

    in_channels: int = 4
    resolution: int = 8
    width: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    hidden: int = 256
    num_groups: int = 16
    labels: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if not self.labels or any(len(v) < 2 for v in self.labels.values()):
            raise ValueError(f"LatentClassifierConfig.labels needs at least one label with >= 2 classes, got "
                             f"{ {k: len(v) for k, v in self.labels.items()} }")
        if not self.channel_mult or self.num_res_blocks < 1:
            raise ValueError("LatentClassifierConfig: channel_mult must be non-empty and num_res_blocks >= 1")
        for m in self.channel_mult:
            if (self.width * m) % self.num_groups:
                raise ValueError(f"LatentClassifierConfig: {self.width * m} channels are not divisible by "
                                 f"num_groups={self.num_groups}")

    @property
    def final_side(self) -> int:
        """Side of the last feature map: the latent side halved (rounding up) once per level after the first."""
        side = self.resolution
        for _ in self.channel_mult[1:]:
            side = (side + 1) // 2
        return side


class LatentClassifier(nn.Module):
    """``forward(z_t, t) -> {label: logits (B, n_classes)}``; :meth:`log_prob` is log p_φ(y | z_t)."""

    config_class = LatentClassifierConfig

    def __init__(self, config: LatentClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        emb_dim = 4 * w
        self.time_embed = TimestepEmbedding(w, emb_dim)
        self.conv_in = nn.Conv2d(config.in_channels, w, 3, padding=1)
        blocks, downs = nn.ModuleList(), nn.ModuleList()
        ch = w
        for level, mult in enumerate(config.channel_mult):
            out = w * mult
            blocks.append(nn.ModuleList(ResBlock(ch if i == 0 else out, out, emb_dim, 0.0, config.num_groups,
                                                 scale_shift_norm=True) for i in range(config.num_res_blocks)))
            ch = out
            downs.append(Downsample(ch) if level < len(config.channel_mult) - 1 else nn.Identity())
        self.blocks, self.downs = blocks, downs
        self.norm_out = nn.GroupNorm(config.num_groups, ch)
        self.hidden = nn.Linear(ch * config.final_side**2, config.hidden)
        self.heads = nn.ModuleDict({name: nn.Linear(config.hidden, len(classes))
                                    for name, classes in config.labels.items()})

    @property
    def label_names(self) -> list[str]:
        return list(self.config.labels)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if z.ndim != 4 or z.shape[1] != self.config.in_channels or z.shape[-1] != self.config.resolution:
            raise ValueError(f"LatentClassifier expects latents (B, {self.config.in_channels}, "
                             f"{self.config.resolution}, {self.config.resolution}), got {tuple(z.shape)}")
        emb = F.silu(self.time_embed(t.reshape(-1).expand(z.shape[0]) if t.numel() == 1 else t))
        h = self.conv_in(z)
        for level, down in zip(self.blocks, self.downs):
            for block in level:
                h = block(h, emb)
            h = down(h)
        h = F.silu(self.hidden(F.silu(self.norm_out(h)).flatten(1)))
        return {name: head(h) for name, head in self.heads.items()}

    def targets(self, labels: dict[str, str] | list[dict[str, str]], batch: int | None = None
                ) -> dict[str, torch.Tensor]:
        """Class indices (−1 where a label is not given) from names: one dict for every sample, or one per sample.

        An unknown label name or class value is a ``ValueError`` listing the known ones."""
        rows = [labels] * (batch or 1) if isinstance(labels, dict) else list(labels)
        out = {}
        for name in self.config.labels:
            classes = self.config.labels[name]
            index = []
            for row in rows:
                value = row.get(name)
                if value is not None and value not in classes:
                    raise ValueError(f"classifier label {name}={value!r} is not one of its classes {classes}")
                index.append(-1 if value is None else classes.index(value))
            out[name] = torch.tensor(index, dtype=torch.long)
        unknown = sorted({k for row in rows for k in row} - set(self.config.labels))
        if unknown:
            raise ValueError(f"the classifier has no label {unknown}: it knows {list(self.config.labels)}")
        return out

    def log_prob(self, z: torch.Tensor, t: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p_φ(y | z_t) = Σ_a log softmax(logits_a)[y_a] per sample (B,), summed over the labelled heads."""
        logits = self(z, t)
        total = torch.zeros(z.shape[0], device=z.device, dtype=torch.float32)
        for name, index in targets.items():
            index = index.to(z.device)
            logp = F.log_softmax(logits[name].float(), dim=1)
            picked = logp.gather(1, index.clamp(min=0)[:, None])[:, 0]
            total = total + torch.where(index >= 0, picked, torch.zeros_like(picked))
        return total
