"""LPIPS perceptual distance with VGG16 features, from local weight files only (nothing is downloaded).

Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric" (CVPR 2018), eq. 1:

    d(x, x0) = sum_l 1 / (H_l W_l) sum_{h,w} || w_l * (y_hat^l_hw - y_hat^l_0hw) ||_2^2

with y_hat^l the channel-wise unit-normalised VGG16 activations after relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3 (Simonyan & Zisserman 2015), and w_l learned non-negative channel weights.

Weights: ``LPIPS.from_file(path)`` reads one file or every ``*.safetensors``/``*.pth``/``*.pt`` file in a
folder and merges them, understanding torchvision's VGG16 keys (``features.N.weight``), the ``lpips``
package's linear heads (``linK.model.1.weight``) and its full-model layout (``net.sliceS.N.weight``).
``.pth`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # indices in vgg16.features of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
# input normalisation of the lpips package, for images in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3, with the same module indices (so its keys load)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, int(item), 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = int(item)
    return nn.Sequential(*layers)


def _normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Per-pixel-broadcastable LPIPS: ``forward(x, y)`` returns (B, 1, 1, 1) distances for images in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.lin = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h)
                if i == TAPS[-1]:
                    break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Zhang et al. 2018, eq. 1: weighted squared distance of unit-normalised features, averaged spatially."""
        if x.shape != y.shape or x.shape[1] != 3:
            raise ValueError(f"LPIPS compares two RGB batches of the same shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        total = 0.0
        for lin, fx, fy in zip(self.lin, self.taps(x), self.taps(y)):
            total = total + lin((_normalize(fx) - _normalize(fy)).pow(2)).mean(dim=(2, 3), keepdim=True)
        return total

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        """Load VGG16 + linear-head weights from a file or a folder of files (see the module docstring)."""
        path = Path(path)
        files = (sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt"))
                 if path.is_dir() else [path])
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"LPIPS weights not found at {path}: give lpips_path a .safetensors/.pth file or a "
                                    "folder with torchvision's VGG16 weights and the lpips package's vgg.pth")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            raw = (load_file(str(f)) if f.suffix == ".safetensors"
                   else torch.load(f, map_location="cpu", weights_only=True))
            state.update(_canonical_keys(raw))
        model = cls()
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"LPIPS weights in {path} lack {len(missing)} tensors (e.g. {missing[:3]}); "
                             "both the VGG16 features and the five linear heads are needed")
        model.load_state_dict({k: state[k] for k in expected}, strict=True)
        return model


def _canonical_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if m := re.fullmatch(r"(?:net\.)?features\.(\d+)\.(weight|bias)", key):
            out[f"features.{m[1]}.{m[2]}"] = value
        elif m := re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key):
            out[f"features.{m[1]}.{m[2]}"] = value
        elif m := re.fullmatch(r"lin(\d)\.model\.1\.weight|lin\.(\d)\.weight", key):
            out[f"lin.{m[1] or m[2]}.weight"] = value
    return out
