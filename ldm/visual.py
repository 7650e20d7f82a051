"""Pictures for people: tensors to PIL images, and image grids (nearest-neighbour upscaled so 32-px images
can be seen)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] → list of RGB PIL images (rounded exactly as PNGs are saved)."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    arr = ((images[:, :3] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: Sequence[Image.Image], rows: int, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile images row-major into a grid (``rows`` rows), optionally upscaled with nearest neighbour."""
    if not images:
        raise ValueError("no images to tile")
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img.resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def tensor_rows_grid(rows: Sequence[torch.Tensor], max_images: int = 8) -> Image.Image:
    """Image batches in [-1, 1] as grid rows (e.g. inputs over reconstructions), at most ``max_images`` each."""
    n = min(min(r.shape[0] for r in rows), max_images)
    return image_grid([img for r in rows for img in to_pil(r[:n])], rows=len(rows), pad=0)
