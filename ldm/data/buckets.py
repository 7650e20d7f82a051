"""Aspect-ratio buckets: train on images of every shape at about one pixel area, without squashing them.

NovelAI's aspect-ratio bucketing (2022), as SDXL uses it (Podell et al. 2023, sec. 2.3 "multi-aspect
training"): a set of resolutions ("buckets") of about equal area ``A`` whose sides are multiples of ``step``
(the VAE factor × 8 in SD trainers: 64 px for f = 8), every image goes to the bucket whose aspect ratio is
nearest its own, is resized to *cover* the bucket (scale s = max(w_b / w, h_b / h)) and cropped to it, and
each batch holds one bucket.

* :func:`make_buckets`: for every width w = step, 2·step, … up to √A, the height
  h = ⌊A / (w · step)⌋ · step, and the transposed bucket (h, w), kept while max(w, h) / min(w, h) ≤
  ``max_aspect``. So A − step · max(w, h) < w · h ≤ A for every bucket (h is rounded down to the grid).
* :func:`assign_bucket`: the bucket minimising |log(w_b / h_b) − log(w / h)| (ties: the larger area).
* Images that would have to be *enlarged* by more than ``max_upscale`` to cover their bucket are refused
  (reason ``too_small``): a 1×4000-pixel strip is not stretched into a training image.
* :func:`bucket_schedule`: which bucket each step of an epoch draws from, from the buckets' sample counts,
  seeded by (seed, epoch) alone — the same sequence on every DDP rank, so all ranks train on the same shape
  at every step (equal work per step; one compiled graph per bucket).

Micro-conditioning data (SDXL sec. 2.2): :func:`cover_crop` also returns the crop's top-left corner in the
resized image, which the loader passes on as ``crop_coords`` beside the image's ``original_size``.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from PIL import Image

Size = tuple[int, int]  # (width, height), as PIL gives it


@dataclass(frozen=True)
class BucketSpec:
    """How buckets are made (the ``buckets:`` block of a data config; ``ldm data folder --buckets``).

    Args:
        area: target pixel area A (e.g. 64·64 = 4096).
        step: bucket sides are multiples of this (the VAE factor × 8 in SD trainers; 32 for an f = 4 VAE).
        max_aspect: the most elongated bucket, max(w, h) / min(w, h).
        max_upscale: images that need a larger enlargement to cover their bucket are skipped (``too_small``).
    """

    area: int = 4096
    step: int = 32
    max_aspect: float = 4.0
    max_upscale: float = 2.0

    def __post_init__(self) -> None:
        if self.step < 1 or self.area < self.step * self.step:
            raise ValueError(f"buckets: need step >= 1 and area >= step² ({self.step}² = {self.step ** 2}), got "
                             f"area={self.area}, step={self.step}")
        if self.max_aspect < 1 or self.max_upscale < 1:
            raise ValueError(f"buckets: max_aspect and max_upscale must be >= 1, got {self.max_aspect}, "
                             f"{self.max_upscale}")

    @classmethod
    def from_config(cls, value: Any, resolution: int | None = None) -> BucketSpec | None:
        """A spec from a config value: None/False (no buckets), True (defaults at ``resolution``²) or a dict."""
        if value is None or value is False:
            return None
        if value is True:
            value = {}
        if isinstance(value, BucketSpec):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"buckets: expected true or a mapping of {list(asdict(cls()))}, got {value!r}")
        unknown = sorted(set(value) - set(asdict(cls())))
        if unknown:
            raise ValueError(f"buckets: unknown keys {unknown} (known: {list(asdict(cls()))})")
        if "area" not in value and resolution is not None:
            value = {**value, "area": resolution * resolution}
        return cls(**value)

    def buckets(self) -> list[Size]:
        return make_buckets(self.area, self.step, self.max_aspect)


def make_buckets(area: int, step: int, max_aspect: float = 4.0) -> list[Size]:
    """The (width, height) buckets of the module docstring, sorted by aspect ratio w / h."""
    out: set[Size] = set()
    w = step
    while w * w <= area:
        h = area // (w * step) * step
        if h >= step and max(w, h) / min(w, h) <= max_aspect:
            out.update({(w, h), (h, w)})
        w += step
    if not out:
        raise ValueError(f"no bucket of area <= {area} with sides in steps of {step} and aspect <= {max_aspect}")
    return sorted(out, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def assign_bucket(size: Size, buckets: Sequence[Size]) -> int:
    """Index of the bucket whose log aspect ratio is nearest ``size``'s (ties: the larger area)."""
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    target = math.log(w / h)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - target),
                                                   -buckets[i][0] * buckets[i][1]))


def cover_scale(size: Size, bucket: Size) -> float:
    """The factor that makes an image of ``size`` just cover ``bucket``: max(w_b / w, h_b / h)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def cover_crop(size: Size, bucket: Size, rng: random.Random | None = None) -> tuple[Size, tuple[int, int]]:
    """(resized size, (top, left) of the crop in it) for covering ``bucket``: centred, or uniform with ``rng``."""
    scale = cover_scale(size, bucket)
    nw, nh = max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))
    left = (nw - bucket[0]) // 2 if rng is None else rng.randint(0, nw - bucket[0])
    top = (nh - bucket[1]) // 2 if rng is None else rng.randint(0, nh - bucket[1])
    return (nw, nh), (top, left)


def resize_to_bucket(image: Image.Image, bucket: Size, rng: random.Random | None = None
                     ) -> tuple[Image.Image, tuple[int, int]]:
    """``image`` resized to cover ``bucket`` (bicubic) and cropped to it; returns (image, (top, left)).

    Only the source region the crop keeps is resampled (``Image.resize(box=...)``), so an elongated image costs
    what its crop costs."""
    (nw, nh), (top, left) = cover_crop(image.size, bucket, rng)
    if (nw, nh) == image.size:
        return image.crop((left, top, left + bucket[0], top + bucket[1])), (top, left)
    sx, sy = image.size[0] / nw, image.size[1] / nh
    box = (left * sx, top * sy, (left + bucket[0]) * sx, (top + bucket[1]) * sy)
    return image.resize(bucket, Image.BICUBIC, box=box, reducing_gap=3.0), (top, left)


def bucket_schedule(counts: Sequence[float], steps: int, seed: int, epoch: int) -> list[int]:
    """``steps`` bucket indices, bucket b appearing in proportion to ``counts[b]`` (largest remainders), in an
    order shuffled by (seed, epoch) only: every rank computes the same list."""
    total = float(sum(counts))
    if steps < 0 or total <= 0:
        raise ValueError(f"bucket_schedule needs steps >= 0 and some samples, got steps={steps}, counts={list(counts)}")
    exact = [c / total * steps for c in counts]
    share = [int(math.floor(e)) for e in exact]
    by_remainder = sorted(range(len(counts)), key=lambda b: (-(exact[b] - share[b]), b))
    for b in by_remainder[:steps - sum(share)]:
        share[b] += 1
    order = [b for b, k in enumerate(share) for _ in range(k)]
    random.Random(f"buckets/{seed}/{epoch}").shuffle(order)
    return order


def bucket_counts(sizes: dict[Size, int], spec: BucketSpec) -> list[int]:
    """Samples per bucket of ``spec`` for a histogram {(w, h): n} of image sizes (too-small images left out)."""
    buckets = spec.buckets()
    counts = [0] * len(buckets)
    for size, n in sizes.items():
        b = assign_bucket(size, buckets)
        if cover_scale(size, buckets[b]) <= spec.max_upscale:
            counts[b] += n
    return counts


def size_key(size: Size) -> str:
    """``"WxH"``: how info.json's ``sizes`` histograms name an image size."""
    return f"{size[0]}x{size[1]}"


def parse_size_key(key: str) -> Size:
    w, _, h = key.partition("x")
    return int(w), int(h)
