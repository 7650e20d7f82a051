"""The 8×8 handwritten digits that scikit-learn ships (``sklearn.datasets.load_digits``: 1,797 images of the UCI
"optical recognition of handwritten digits" test set, 16 gray levels + white), as webdataset shards.

No download: the data is part of the scikit-learn package. Pixel values 0..16 are mapped to 8-bit gray
round(v · 255/16) and stored as grayscale PNGs, so the images are genuine 8-bit data (17 of the 256 levels used)
and a discretized-decoder bound on them is in the papers' 8-bit bits/dim. Captions name the digit
("a handwritten digit 7"); the json holds the label. The split is a seeded permutation: ``val`` images held out.
A pixel-space model reads them with ``IdentityFirstStage(z_channels=1)`` (64 dims per image).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldm.data.registry import Benchmark
from ldm.data.shapes import png_bytes
from ldm.data.shards import clear_split, encode_sample, plan_shards, shard_name, write_info, write_shard
from ldm.errors import UsageError

LICENSE = "CC BY 4.0 (UCI ML repository, optical recognition of handwritten digits; shipped with scikit-learn)"
SOURCE = "sklearn.datasets.load_digits (Alpaydin & Kaynak 1998, UCI)"


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (1797, 8, 8) in 0..255, labels (1797,)) from scikit-learn; a clear error without it."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UsageError("`ldm data digits` needs scikit-learn: pip install scikit-learn "
                         "(or pip install 'ldm[digits]')") from e
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def build_digits(out_dir: str | Path, val: int = 297, seed: int = 0, shard_size: int = 1000) -> dict[str, Any]:
    """Write ``out_dir/{train,val}/*.tar`` + ``info.json`` (1,797 − ``val`` train images); returns the info."""
    images, labels = load_digit_images()
    if not 0 <= val < len(images):
        raise UsageError(f"--val must be in [0, {len(images) - 1}], got {val}")
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    splits = {"val": order[:val], "train": order[val:]}
    out, shards = Path(out_dir), {}
    for split, indices in splits.items():
        clear_split(out, split)
        per_shard = shard_size if split == "train" else max(1, min(shard_size, -(-len(indices) // 8)))
        shards[split] = {}
        for k, (start, end) in enumerate(plan_shards(len(indices), per_shard)):
            samples = []
            for i in indices[start:end]:
                label = int(labels[i])
                meta = {"label": label, "index": i, "split": split}
                png = png_bytes(Image.fromarray(images[i], mode="L"))
                samples.append((f"{split}_{i:05d}", encode_sample(png, f"a handwritten digit {label}", meta)))
            shards[split][shard_name(split, k)] = write_shard(out / split / shard_name(split, k), samples)
    info = {"name": "digits", "source": SOURCE, "license": LICENSE, "resolution": 8,
            "counts": {s: len(v) for s, v in splits.items()}, "shards": shards,
            "generator": {"seed": seed, "levels": "round(v * 255 / 16), v in 0..16"}}
    write_info(out, info)
    return info


class DigitsBenchmark(Benchmark):
    """Validation prompts (the captions; an unconditional model ignores them)."""

    def val_prompts(self) -> list[str]:
        return [f"a handwritten digit {d}" for d in (0, 3, 5, 8)]


BENCHMARK = DigitsBenchmark()
