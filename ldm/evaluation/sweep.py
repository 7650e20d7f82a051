"""Evaluate a text-to-image pipeline against real images, over a grid of sampler × steps × guidance.

Each grid point generates one image per caption of the real split (caption-matched), then measures FD
(``fid`` or ``fd_clip``, see ``ldm.evaluation.fid``), KID, CLIP score and — on shapes — prompt adherence
read back by the shapes probe. Reference points put the numbers in scale: the FD between the train and val
splits (real vs real, the floor at this n) and the FD of the VAE's reconstructions of the real images (the
autoencoder's ceiling, "rFID" with Inception features). Results go to a CSV and PNG plots: FD vs guidance,
FD vs model evaluations (quality per NFE) and FD vs CLIP score (the guidance trade-off curve).
"""

from __future__ import annotations

import csv
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ldm import table
from ldm.data import shapes as shapes_data
from ldm.errors import UsageError
from ldm.evaluation.fid import (
    RealSplit,
    cached_features,
    clip_score,
    distribution_metrics,
    extract_features,
    frechet_distance,
    load_split,
    metric_name,
    real_cache_key,
    to_uint8,
)
from ldm.evaluation.shapes_probe import ALL_THREE, ShapesProbe, adherence
from ldm.pipeline import TextToImagePipeline
from ldm.table import percent

SWEEP_KEYS = ("sampler", "steps", "guidance")
ADHERENCE_KEYS = ("color", "shape", "position", "all_three")
# single-object caption templates that name the position (all of them name colour and shape)
POSITIONED_TEMPLATES = frozenset(name for name, text in shapes_data.SINGLE_TEMPLATES.items()
                                 if "{where}" in text or "{position}" in text)


def model_evaluations(sampler: str, steps: int) -> int:
    """U-Net evaluations of one sample (cond + uncond run as one batch): Heun takes 2N − 1, the others N."""
    return 2 * steps - 1 if sampler == "heun" else steps


def adherence_targets(metas: Sequence[dict[str, Any]]) -> tuple[list[int], list[dict[str, str]]]:
    """Indices and colour/shape/position targets of the single-object shapes samples whose caption names all three."""
    index, targets = [], []
    for i, meta in enumerate(metas):
        objects = meta.get("objects") or []
        if len(objects) == 1 and meta.get("template") in POSITIONED_TEMPLATES:
            index.append(i)
            targets.append({a: objects[0][a] for a in ALL_THREE})
    return index, targets


def caption_adherence(probe: ShapesProbe, images: torch.Tensor, metas: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Shapes prompt adherence of images generated from the shapes captions of ``metas``: the probe reads colour,
    shape and position back (``shapes_probe.adherence``) on the single-object, positioned captions."""
    index, targets = adherence_targets(metas)
    if not index:
        return {"adherence_n": 0}
    x = images[index]
    x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x
    scores = adherence(probe.predict(x.to(next(probe.parameters()).device)), targets)
    return {"adherence_n": scores.pop("n"), **{k: scores[k] for k in ADHERENCE_KEYS}}


def generate_for(pipe: TextToImagePipeline, prompts: Sequence[str], sampler: str, steps: int, guidance: float,
                 seed: int, batch_size: int) -> tuple[torch.Tensor, float]:
    """uint8 images, one per prompt, and the seconds it took."""
    start = time.perf_counter()
    images = pipe.generate(list(prompts), steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                           batch_size=batch_size, progress=False)
    return to_uint8(images), time.perf_counter() - start


def evaluate_point(pipe: TextToImagePipeline, real: RealSplit, real_features: torch.Tensor, extractor: nn.Module,
                   sampler: str, steps: int, guidance: float, seed: int = 0, batch_size: int = 100,
                   clip_metric: nn.Module | None = None, scorer: Callable[..., dict[str, Any]] | None = None,
                   kid_subset_size: int = 1000) -> dict[str, Any]:
    """One grid point: generate from ``real.captions`` and measure FD, KID, CLIP score and adherence (with the
    dataset's ``scorer``, ``Benchmark.adherence_scorer``)."""
    images, seconds = generate_for(pipe, real.captions, sampler, steps, guidance, seed, batch_size)
    fake = extract_features(extractor, images, batch_size)
    row: dict[str, Any] = {"sampler": sampler, "steps": steps, "nfe": model_evaluations(sampler, steps),
                           "guidance": guidance, "seed": seed, "n": len(images)}
    row.update(distribution_metrics(real_features, fake, metric_name(extractor), kid_subset_size, seed=seed))
    if clip_metric is not None:
        row["clip_score"] = clip_score(clip_metric, images, real.captions, batch_size)
    if scorer is not None:
        row.update(scorer(images, real.metas))
    row["seconds"] = round(seconds, 2)
    row["img_per_s"] = round(len(images) / max(seconds, 1e-9), 2)
    return row


def reference_points(pipe: TextToImagePipeline, extractor: nn.Module, real: RealSplit, real_features: torch.Tensor,
                     data_dir: str | Path, split: str, cache_dir: str | Path | None, batch_size: int = 100,
                     clip_metric: nn.Module | None = None) -> dict[str, float]:
    """FD of real train vs real ``split`` images (same n: the floor) and of the VAE's reconstructions of the
    real images vs the originals (the autoencoder's ceiling; "rFID" on Inception features); with
    ``clip_metric``, the CLIP score of the real images with their own captions."""
    name, n = metric_name(extractor), len(real.captions)
    size = real.images.shape[-1]
    other = "train" if split != "train" else "val"
    train_features, _ = cached_features(real_cache_key(data_dir, other, size, n, extractor), cache_dir,
                                        lambda: extract_features(extractor, load_split(data_dir, other, n, size).images,
                                                                 batch_size))
    recon = []
    vae = pipe.vae
    with torch.no_grad():
        for chunk in real.images.split(batch_size):
            x = (chunk.float() / 127.5 - 1).to(pipe.device, pipe.dtype)
            recon.append(to_uint8(vae.decode_latents(vae.encode_latents(x)).float().cpu()))
    recon_features = extract_features(extractor, torch.cat(recon), batch_size)
    refs = {f"{name}_{other}_vs_{split}": frechet_distance(train_features, real_features),
            f"{name}_vae_recon": frechet_distance(real_features, recon_features)}
    if clip_metric is not None:
        refs["clip_score_real"] = clip_score(clip_metric, real.images, real.captions, batch_size)
    return refs


def sweep_grid(values: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The grid points (dicts of sampler, steps, guidance), samplers outermost, guidance innermost."""
    unknown = sorted(set(values) - set(SWEEP_KEYS))
    if unknown:
        raise UsageError(f"cannot sweep {unknown}: --sweep takes {list(SWEEP_KEYS)} (e.g. guidance=1,2,4 steps=10,20)")
    return [dict(zip(SWEEP_KEYS, combo)) for combo in itertools.product(*(values[k] for k in SWEEP_KEYS))]


# ----------------------------------------------------------------------------------------------- outputs
def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One line per grid point; columns are the union of the rows' keys in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(rows: Sequence[dict[str, Any]], references: dict[str, float] | None = None) -> str:
    """Sampler, steps, guidance, FD, KID, CLIP score, adherence (%), speed; then the reference points."""
    if not rows:
        return ""
    fd = next(k for k in rows[0] if k in ("fid", "fd_clip", "fd"))
    kid = "kid_clip" if fd == "fd_clip" else "kid"
    columns = [("sampler", "sampler", ""), ("steps", "steps", ""), ("guidance", "guid.", "g"), (fd, fd, ".4f"),
               (kid, f"{kid} ×1e3", lambda r: f"{1e3 * r[kid]:.3f}"), ("clip_score", "clip", ".2f"),
               ("color", "colour", percent("color")), ("shape", "shape", percent("shape")),
               ("position", "pos.", percent("position")), ("all_three", "all 3", percent("all_three"))]
    if any("pair_all" in r for r in rows):  # two-object captions: both present, bound, relation, all
        columns += [("pair_present", "2-obj present", percent("pair_present")),
                    ("pair_bound", "bound", percent("pair_bound")), ("pair_relation", "rel.", percent("pair_relation")),
                    ("pair_all", "2-obj all", percent("pair_all"))]
    columns.append(("img_per_s", "img/s", ""))
    lines = [table.format_table(rows, columns)]
    lines += [f"reference {key}: {value:.4f}" for key, value in (references or {}).items()]
    return "\n".join(lines)


def _series(rows: Sequence[dict[str, Any]], group: Sequence[str], order: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = ", ".join(f"{r[g]}" if g == "sampler" else f"{g} {r[g]:g}" for g in group)
        out.setdefault(label, []).append(r)
    return {k: sorted(v, key=lambda r: r[order]) for k, v in out.items()}


def plot_sweep(rows: Sequence[dict[str, Any]], prefix: str | Path, references: dict[str, float] | None = None
               ) -> list[Path]:
    """PNG plots ``{prefix}_fd_vs_guidance.png``, ``_fd_vs_nfe.png`` and ``_fd_vs_clip_score.png``; dashed lines
    mark the reference FDs. A plot whose x axis does not vary in the sweep is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fd = next(k for k in rows[0] if k in ("fid", "fd_clip", "fd"))
    plots = [("guidance", ("sampler", "steps"), "guidance scale w", "fd_vs_guidance"),
             ("nfe", ("sampler", "guidance"), "U-Net evaluations per image (NFE)", "fd_vs_nfe"),
             ("clip_score", ("sampler", "steps"), "CLIP score (project CLIP)", "fd_vs_clip_score")]
    written = []
    for x, group, xlabel, name in plots:
        if any(x not in r for r in rows) or len({r[x] for r in rows}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        # the trade-off curve is traced in guidance order; the others along their x axis
        for label, series in _series(rows, group, "guidance" if x == "clip_score" else x).items():
            ax.plot([r[x] for r in series], [r[fd] for r in series], marker="o", label=label)
            if x == "clip_score":
                for r in series:
                    ax.annotate(f"w={r['guidance']:g}", (r[x], r[fd]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        lines = [(k, v) for k, v in (references or {}).items() if k.startswith(fd) and math.isfinite(v)]
        for i, (key, value) in enumerate(lines):  # labels side by side: the reference FDs are often close
            ax.axhline(value, linestyle="--", linewidth=1, color="gray")
            ax.annotate(key, (0.01 + 0.5 * i, value), xycoords=("axes fraction", "data"), fontsize=7, color="gray",
                        xytext=(0, 2), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(fd)
        ax.set_title(f"{fd} vs {xlabel.split(' (')[0]} (n = {rows[0]['n']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(f"{prefix}_{name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
