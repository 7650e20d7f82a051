"""The shapes probe: read colour, shape, position, size and background back from a shapes image.

A small CNN (CoordConv input, three conv stages, one hidden layer, five classification heads) trained
on single-object images of the ``shapes`` dataset with the labels in each sample's json. It measures
what the VAE keeps (originals vs reconstructions) and what a text-to-image model generates (prompt
adherence: does "a large red circle on the left" give a red circle on the left?).

Generated images are blurry, noisy and slightly off in colour and place in ways the renderer never
is, so training degrades its inputs (see ``augment``): blur, noise, contrast and colour jitter, and
±2 px shifts (below half the ≥ 5.7 px between grid cells, so the position label stays true).

The probe is an exported part (``ldm.io``): ``save_part(probe, dir)`` / ``load_probe(dir)``.
Imports neither Lightning nor webdataset.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ldm.data import shapes as shapes_data
from ldm.data.images import decode_rgb
from ldm.data.shards import list_shards, read_info, read_shard
from ldm.io import load_part, save_part, write_json

ATTRIBUTES = ("color", "shape", "position", "size", "background")
ALL_THREE = ("color", "shape", "position")


@dataclass
class ShapesProbeConfig:
    resolution: int = 32
    width: int = 24
    hidden: int = 128
    colors: list[str] = field(default_factory=lambda: list(shapes_data.COLORS))
    shapes: list[str] = field(default_factory=lambda: list(shapes_data.SHAPES))
    positions: list[str] = field(default_factory=lambda: list(shapes_data.POSITIONS))
    sizes: list[str] = field(default_factory=lambda: list(shapes_data.SIZES))
    backgrounds: list[str] = field(default_factory=lambda: list(shapes_data.BACKGROUNDS))

    def vocab(self, attribute: str) -> list[str]:
        return {"color": self.colors, "shape": self.shapes, "position": self.positions, "size": self.sizes,
                "background": self.backgrounds}[attribute]


def _stage(cin: int, cout: int) -> nn.Sequential:
    """3×3 convolution with stride 2 (halves the side), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ShapesProbe(nn.Module):
    """CNN over (RGB + x/y coordinate) channels → five heads of logits, one per attribute.

    Three stride-2 conv stages (R → R/8, widths w, 2w, 4w); the heads read a hidden layer over the
    flattened map (it keeps where things are) concatenated with the globally max-pooled map (what is
    there, wherever it is). One linear head per attribute.
    """

    config_class = ShapesProbeConfig

    def __init__(self, config: ShapesProbeConfig) -> None:
        super().__init__()
        self.config = config
        self.metrics: dict[str, Any] = {}  # filled by train_probe / load_probe (metrics.json)
        w, r = config.width, config.resolution
        if r % 8:
            raise ValueError(f"ShapesProbe resolution must be divisible by 8, got {r}")
        self.features = nn.Sequential(_stage(5, w), _stage(w, 2 * w), _stage(2 * w, 4 * w))
        self.where = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * (r // 8) ** 2, config.hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({a: nn.Linear(config.hidden + 4 * w, len(config.vocab(a))) for a in ATTRIBUTES})
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, r), torch.linspace(-1, 1, r), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check (B, 3, H, W) in [-1, 1] and resample to the probe's resolution (area for downsizing)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ShapesProbe expects images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        images = images.to(self.coords.device, torch.float32)
        r = self.config.resolution
        if images.shape[-2:] != (r, r):
            if images.shape[-1] > r:
                images = F.interpolate(images, size=(r, r), mode="area")
            else:
                images = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False)
        return images

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.prepare(images)
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        fmap = self.features(x)
        # flattened map: where things are; global max-pool: what they are, wherever they are
        h = torch.cat([self.where(fmap), fmap.amax(dim=(2, 3))], dim=1)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Predicted attribute names for each image: ``{"color": [...], "shape": [...], ...}``."""
        was_training = self.training
        self.eval()
        out: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
        for chunk in images.split(batch_size):
            logits = self(chunk)
            for a in ATTRIBUTES:
                vocab = self.config.vocab(a)
                out[a] += [vocab[i] for i in logits[a].argmax(1).tolist()]
        self.train(was_training)
        return out


def adherence(predictions: dict[str, list[str]], targets: Sequence[dict[str, str]] | dict[str, list[str]]
              ) -> dict[str, float]:
    """Per-attribute accuracy of ``predictions`` against ``targets`` + ``all_three`` (colour, shape and
    position all right) and ``n``. ``targets``: a list of attribute dicts (as from
    ``shapes.eval_prompts``) or a dict of lists; attributes missing from either side are left out.
    """
    if not isinstance(targets, dict):
        targets = {a: [t[a] for t in targets] for a in ATTRIBUTES if targets and all(a in t for t in targets)}
    n = len(next(iter(targets.values()), []))
    if n == 0:
        raise ValueError("adherence needs at least one target")
    result: dict[str, float] = {"n": n}
    correct = {}
    for a, wanted in targets.items():
        if a not in predictions:
            continue
        got = predictions[a]
        if len(got) != n or len(wanted) != n:
            raise ValueError(f"adherence: {a} has {len(got)} predictions for {len(wanted)} targets (expected {n})")
        correct[a] = [g == w for g, w in zip(got, wanted)]
        result[a] = sum(correct[a]) / n
    if all(a in correct for a in ALL_THREE):
        result["all_three"] = sum(all(c) for c in zip(*(correct[a] for a in ALL_THREE))) / n
    return result


# ---- data -------------------------------------------------------------------------------------------
def load_labelled(data_dir: str | Path, split: str, limit: int | None = None, resolution: int = 32
                  ) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """Single-object images of a shapes split as a uint8 (N, 3, R, R) tensor + their attribute dicts."""
    images, labels = [], []
    for url in list_shards(data_dir, split):
        for _, files in read_shard(url):
            meta = json.loads(files["json"])
            objects = meta.get("objects", [])
            if len(objects) != 1:
                continue
            im = decode_rgb(files["png"])
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BOX)
            images.append(np.asarray(im))
            o = objects[0]
            labels.append({"color": o["color"], "shape": o["shape"], "position": o["position"], "size": o["size"],
                           "background": meta["background"]})
            if limit is not None and len(images) >= limit:
                break
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no single-object shapes samples in {data_dir} ({split}); build them with `ldm data shapes`")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1]."""
    return images.float() / 127.5 - 1


def augment(x: torch.Tensor, generator: torch.Generator, return_shift: bool = False
            ) -> torch.Tensor | tuple[torch.Tensor, tuple[int, int]]:
    """Degrade a [-1, 1] batch the way generated images are degraded, keeping every label true.

    A shift of up to ±2 px (below half the ≥ 5.7 px between grid cells), Gaussian blur with σ ≤ 1.2 px
    on half the images, contrast 0.8–1.1 about the image mean, per-channel gain ±8 % and offset ±0.06,
    and Gaussian noise with σ ≤ 0.12. ``return_shift``: also return the shift ``(dx, dy)`` in pixels (the
    content moves by ``(−dx, −dy)``), for labels that are coordinates.
    """
    b, c, h, w = x.shape
    g = dict(generator=generator, device=x.device)
    dx, dy = (torch.randint(-2, 3, (2,), generator=generator)).tolist()
    x = F.pad(x, (2, 2, 2, 2), mode="replicate")[:, :, 2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
    sigma = torch.rand(b, **g) * 1.2 * (torch.rand(b, **g) < 0.5)
    taps = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b·c, 7)
    y = F.pad(x.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="replicate")
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    x = F.conv2d(y, kernel[:, None, None, :], groups=b * c).reshape(b, c, h, w)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (0.8 + 0.3 * torch.rand(b, 1, 1, 1, **g))
    gain = 1 + (torch.rand(b, c, 1, 1, **g) - 0.5) * 0.16
    offset = (torch.rand(b, c, 1, 1, **g) - 0.5) * 0.12
    noise = torch.randn(x.shape, **g) * torch.rand(b, 1, 1, 1, **g) * 0.12
    out = ((x + 1) * gain - 1 + offset + noise).clamp(-1, 1)
    return (out, (dx, dy)) if return_shift else out


def _targets(probe: ShapesProbe, labels: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    index = {a: {v: i for i, v in enumerate(probe.config.vocab(a))} for a in ATTRIBUTES}
    return {a: torch.tensor([index[a][lab[a]] for lab in labels]) for a in ATTRIBUTES}


@torch.no_grad()
def evaluate_probe(probe: ShapesProbe, images: torch.Tensor, labels: list[dict[str, str]]) -> dict[str, float]:
    """``adherence`` of the probe on uint8 or [-1, 1] images with known labels (all five attributes)."""
    x = to_unit(images) if images.dtype == torch.uint8 else images
    return adherence(probe.predict(x), labels)


def train_probe(data_dir: str | Path, out_dir: str | Path | None = None, steps: int = 800, batch_size: int = 128,
                lr: float = 3e-3, max_train: int = 24_000, max_val: int | None = None, seed: int = 0,
                config: ShapesProbeConfig | None = None, log: Callable[[str], None] | None = print,
                num_threads: int | None = 1) -> ShapesProbe:
    """Train a probe on the single-object train images of ``data_dir``; export it to ``out_dir``.

    AdamW with a one-cycle (linear warm-up, cosine decay) learning rate, the sum of the five heads'
    cross-entropies, augmented batches (see ``augment``). The val accuracy (``evaluate_probe``) and the
    training time are written to ``out_dir/metrics.json`` and kept as ``probe.metrics``.
    ``num_threads`` (restored afterwards; None = unchanged): the convolutions are too small to gain from
    intra-op threads, and on a shared 2-core machine a second thread made training several times slower.
    """
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _train_probe(data_dir, out_dir, steps, batch_size, lr, max_train, max_val, seed, config, log)
    finally:
        torch.set_num_threads(previous_threads)


def _train_probe(data_dir: str | Path, out_dir: str | Path | None, steps: int, batch_size: int, lr: float,
                 max_train: int, max_val: int | None, seed: int, config: ShapesProbeConfig | None,
                 log: Callable[[str], None] | None) -> ShapesProbe:
    start, start_cpu = time.perf_counter(), time.process_time()
    config = config or ShapesProbeConfig(resolution=int(read_info(data_dir).get("resolution") or 32))
    images, labels = load_labelled(data_dir, "train", max_train, config.resolution)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = ShapesProbe(config)
    targets = _targets(probe, labels)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def one_cycle(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle)
    probe.train()
    order = torch.randperm(len(labels), generator=generator)
    cursor = 0
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(labels), generator=generator), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        logits = probe(augment(to_unit(images[idx]), generator))
        loss = sum(F.cross_entropy(logits[a], targets[a][idx]) for a in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"probe step {step}/{steps} loss {loss.item():.4f}")
    probe.eval()
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    val_images, val_labels = load_labelled(data_dir, "val", max_val, config.resolution)
    metrics = {"val": evaluate_probe(probe, val_images, val_labels), "train_seconds": round(train_seconds, 1),
               "train_cpu_seconds": round(train_cpu_seconds, 1), "steps": steps, "batch_size": batch_size,
               "train_images": len(labels), "seed": seed, "data_dir": str(data_dir)}
    probe.metrics = metrics
    if log:
        log("probe val accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["val"].items() if k != "n")
            + f" (n={metrics['val']['n']}, {train_seconds:.0f} s)")
    if out_dir is not None:
        save_part(probe, out_dir)
        write_json(Path(out_dir) / "metrics.json", metrics)
    return probe


def load_probe(path: str | Path, map_location: str | torch.device = "cpu") -> ShapesProbe:
    """Load an exported probe (config.json + model.safetensors) in eval mode, with its metrics.json."""
    probe = load_part(path, ShapesProbe, map_location=map_location)
    metrics = Path(path) / "metrics.json"
    probe.metrics = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return probe


def load_or_train_probe(data_dir: str | Path, probe_dir: str | Path, **train_kwargs: Any) -> ShapesProbe:
    """The probe in ``probe_dir`` if it exists, else one trained on ``data_dir`` and exported there."""
    if (Path(probe_dir) / "model.safetensors").is_file():
        return load_probe(probe_dir)
    return train_probe(data_dir, probe_dir, **train_kwargs)
