"""Pictures for people: tensors to PIL images, and image grids (nearest-neighbour upscaled so 32-px images
can be seen, each row optionally labelled, e.g. with its prompt)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_FONT_SIZE = 13


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] → list of RGB PIL images (rounded exactly as PNGs are saved)."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    arr = ((images[:, :3] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: Sequence[Image.Image], rows: int, scale: int = 1, pad: int = 2,
               row_labels: Sequence[str] | None = None) -> Image.Image:
    """Tile images row-major into a grid (``rows`` rows), optionally upscaled with nearest neighbour, with
    ``row_labels`` (one per row, e.g. the prompt) written above each row, shortened with "…" to the row's width."""
    if not images:
        raise ValueError("no images to tile")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    w, h = w * scale, h * scale
    font = ImageFont.load_default(size=LABEL_FONT_SIZE) if row_labels is not None else None
    band = LABEL_FONT_SIZE + 6 if row_labels is not None else 0
    width = cols * (w + pad) + pad
    grid = Image.new("RGB", (width, rows * (h + pad + band) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        top = pad + r * (h + pad + band)
        if row_labels is not None:
            draw.text((pad + 2, top + 2), fit_text(draw, row_labels[r], font, width - 2 * pad - 4), fill=(0, 0, 0),
                      font=font)
        for c in range(cols):
            i = r * cols + c
            if i < len(images):
                grid.paste(images[i].resize((w, h), Image.NEAREST), (pad + c * (w + pad), top + band))
    return grid


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` cut (with "…") to at most ``width`` pixels in ``font``; "" is shown as "(unconditional)"."""
    text = text or "(unconditional)"
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def tensor_rows_grid(rows: Sequence[torch.Tensor], max_images: int = 8) -> Image.Image:
    """Image batches in [-1, 1] as grid rows (e.g. inputs over reconstructions), at most ``max_images`` each."""
    n = min(min(r.shape[0] for r in rows), max_images)
    return image_grid([img for r in rows for img in to_pil(r[:n])], rows=len(rows), pad=0)
