"""Scalar conditions added to the time embedding: SDXL's size and crop micro-conditioning (Podell et al. 2023).

SDXL sec. 2.2 conditions the U-Net on the image's original size c_size = (h_orig, w_orig) and the crop's top-left
corner c_crop = (c_top, c_left), and sec. 2.3 (multi-aspect training) on the target bucket size c_ar =
(h_tgt, w_tgt): each scalar is embedded with the Fourier features of the timestep embedding, the features are
concatenated, projected, and added to the time embedding. At sampling c_size = c_ar = the requested size and
c_crop = (0, 0) ask for a well-framed image at full resolution.

Here the conditions travel as ``Conditioning.extras`` (name → (B, k) tensor) and a denoiser asks for them with the
general config field ``extra_conditions`` ({name: k}); :class:`ExtraConditionEmbedding` embeds them. Its output
layer is zero-initialised: a denoiser that gains the field (say a fine-tuning of one trained without it) starts
out computing exactly what it computed before, and learns the conditions' effect from there.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ldm.conditioning import Conditioning
from ldm.modules.embeddings import timestep_embedding

# SDXL's three pairs, (height, width) / (top, left), in pixels
SIZE_CONDITIONS: dict[str, int] = {"original_size": 2, "crop_coords": 2, "target_size": 2}
FOURIER_DIM = 64  # sinusoid features per scalar (SDXL: 256 at 1024 px)


class ExtraConditionEmbedding(nn.Module):
    """``{name: (B, k)} -> Linear(SiLU(Linear([fourier(v) for every scalar v])))``, the last Linear zero-initialised."""

    def __init__(self, conditions: Mapping[str, int], embed_dim: int, fourier_dim: int = FOURIER_DIM):
        super().__init__()
        if not conditions or any(int(k) < 1 for k in conditions.values()):
            raise ValueError(f"extra_conditions must map names to scalar counts >= 1, got {dict(conditions)}")
        self.names = sorted(conditions)
        self.sizes = {name: int(conditions[name]) for name in self.names}
        self.fourier_dim = fourier_dim
        scalars = sum(self.sizes.values())
        self.linear_1 = nn.Linear(scalars * fourier_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, extras: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        missing = [n for n in self.names if n not in extras]
        if missing:
            raise ValueError(f"this denoiser is conditioned on {self.names} (config extra_conditions) but cond.extras "
                             f"lacks {missing}: pass them in Conditioning.extras (the pipeline fills the defaults)")
        columns = []
        for name in self.names:
            value = extras[name]
            if value.shape != (batch, self.sizes[name]):
                raise ValueError(f"cond.extras[{name!r}] must be (B={batch}, {self.sizes[name]}), "
                                 f"got {tuple(value.shape)}")
            columns.append(value.to(self.linear_1.weight.device, torch.float32))
        scalars = torch.cat(columns, dim=1)                                    # (B, S)
        features = timestep_embedding(scalars.reshape(-1), self.fourier_dim)   # one sinusoid per scalar
        features = features.reshape(batch, -1).to(self.linear_1.weight.dtype)  # (B, S * F)
        return self.linear_2(F.silu(self.linear_1(features)))


def size_extras(original: torch.Tensor, crop: torch.Tensor, target: tuple[int, int],
                names: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The SDXL extras of a batch: ``original`` (B, 2) (height, width), ``crop`` (B, 2) (top, left), the target
    (height, width) of every image; only the ``names`` a denoiser asks for (all three when None)."""
    batch = original.shape[0]
    values = {"original_size": original.float(), "crop_coords": crop.float(),
              "target_size": torch.tensor([list(target)], dtype=torch.float32).expand(batch, 2)}
    wanted = SIZE_CONDITIONS if names is None else names
    return {k: v for k, v in values.items() if k in wanted}


def wanted_conditions(denoiser: nn.Module) -> dict[str, int]:
    """The ``extra_conditions`` a denoiser's config asks for ({} when none)."""
    return dict(getattr(denoiser.config, "extra_conditions", None) or {})


def with_default_extras(denoiser: nn.Module, cond: Conditioning, height: int, width: int) -> Conditioning:
    """``cond`` plus the extras the denoiser asks for and ``cond`` lacks, at their sampling defaults: original and
    target size = the requested (height, width), crop = (0, 0) (SDXL sec. 2.2). Unknown names are an error."""
    wanted = wanted_conditions(denoiser)
    missing = {k: v for k, v in wanted.items() if k not in cond.extras}
    if not missing:
        return cond
    unknown = sorted(set(missing) - set(SIZE_CONDITIONS))
    if unknown:
        raise ValueError(f"the denoiser asks for extras {unknown} that have no default: "
                         "pass them in Conditioning.extras")
    b = cond.batch_size
    size = torch.tensor([[height, width]], dtype=torch.float32).expand(b, 2)
    defaults = size_extras(size, torch.zeros(b, 2), (height, width), missing)
    device = cond.tokens.device
    return Conditioning(cond.tokens, cond.mask, cond.pooled,
                        {**cond.extras, **{k: v.to(device) for k, v in defaults.items()}})
