"""Evaluate a pipeline folder against real images: FD (in CLIP space or Inception FID), KID, CLIP score and, on
shapes data, prompt adherence, at one point or over a sampler × steps × guidance grid (what ``ldm fid`` runs).

:func:`evaluate_pipeline` loads everything, computes (or reads from the cache) the real features and the
reference points, evaluates each grid point and returns one result dict; :func:`save_evaluation` writes it
as JSON and, for a sweep, a CSV and plots beside it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ldm.errors import UsageError
from ldm.evaluation import fid, sweep
from ldm.io import PartError


def folder_hash(path: str | Path) -> str:
    """sha256 over the names and bytes of a pipeline folder's configs and weights (what defines the model)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")):
        h.update(f"{f.relative_to(path)}|".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def evaluate_pipeline(pipeline: str | Path, data: str | Path, split: str = "val", n: int = 2000, *,
                      steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                      grid: dict[str, Sequence[Any]] | None = None, features: str = "clip",
                      inception_weights: str | Path | None = None, image_encoder: str | Path | None = None,
                      clip_score_model: str | Path | None = None, probe: str | Path | None = None,
                      probe_steps: int = 1500, references: bool = True, cache_dir: str | Path | None = None,
                      batch_size: int = 100, seed: int = 0, device: str | torch.device = "cpu",
                      on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Metrics of the pipeline folder ``pipeline`` on the first ``n`` images of ``data/split``.

    One point (``steps``/``sampler``/``guidance``, None: pipeline.json's) or, with ``grid`` (``{"steps":
    [...], ...}``, replacing those keys), every point of the grid; ``on_row`` is called with each point's
    row as soon as it is measured. ``features`` is ``clip`` (FD in the CLIP image space of ``image_encoder``,
    default ``pipeline/text_encoder/image_encoder``) or ``inception`` (FID with the ``inception_weights``
    file). Adherence is measured with the dataset's probe (``Benchmark.adherence_scorer``; shapes has one) at
    ``probe`` (trained there if missing).
    Real features are cached under ``cache_dir`` (None: off). Returns the JSON-ready result: settings,
    hashes, ``references``, ``results`` (one row per point) and, for one point, its metrics at the top level.
    """
    from ldm.data.registry import benchmark_named
    from ldm.data.shards import read_info
    from ldm.diffusion.samplers import SAMPLERS
    from ldm.pipeline import TextToImagePipeline

    start = time.perf_counter()
    if features not in ("clip", "inception"):
        raise UsageError(f"features must be 'clip' or 'inception', got {features!r}")
    if features == "inception":
        extractor = fid.inception_features(inception_weights)  # fails early, before anything is loaded
    pipe = TextToImagePipeline.from_pretrained(pipeline, device=device)
    if pipe.config.height != pipe.config.width:
        raise PartError(f"{pipeline}: FD compares square images; the pipeline makes "
                        f"{pipe.config.height}x{pipe.config.width}")
    encoder_dir = Path(image_encoder) if image_encoder else Path(pipeline) / "text_encoder" / "image_encoder"
    image_features = None
    if features == "clip" or clip_score_model is None:
        image_features = fid.CLIPImageFeatures.from_part(encoder_dir).to(device)
    if features == "clip":
        extractor = image_features
    extractor = extractor.to(device)
    if clip_score_model:
        clip_metric = fid.hf_clip_score(clip_score_model)
    else:
        clip_metric = fid.project_clip_score(pipe.text_encoder, image_features.encoder)

    c = pipe.config
    grid_values: dict[str, list[Any]] = {"sampler": [sampler or c.sampler], "steps": [steps or c.steps],
                                         "guidance": [c.guidance if guidance is None else guidance]}
    grid_values.update({k: list(v) for k, v in (grid or {}).items()})
    unknown = [s for s in grid_values["sampler"] if s not in SAMPLERS]
    if unknown:
        raise UsageError(f"unknown sampler(s) {unknown}: use {list(SAMPLERS)}")
    points = sweep.sweep_grid(grid_values)

    benchmark = benchmark_named(read_info(data).get("name"))
    scorer = None
    if benchmark is not None and probe is not None:
        scorer = benchmark.adherence_scorer(str(data), str(probe), probe_steps, device)

    size = pipe.config.height
    real = fid.load_split(data, split, n, size)
    real_features, hit = fid.cached_features(fid.real_cache_key(data, split, size, n, extractor), cache_dir,
                                             lambda: fid.extract_features(extractor, real.images, batch_size))
    refs = sweep.reference_points(pipe, extractor, real, real_features, data, split, cache_dir, batch_size,
                                  clip_metric) if references else {}
    rows = []
    for point in points:
        rows.append(sweep.evaluate_point(pipe, real, real_features, extractor, seed=seed, batch_size=batch_size,
                                         clip_metric=clip_metric, scorer=scorer, **point))
        if on_row is not None:
            on_row(rows[-1])

    result: dict[str, Any] = {
        "pipeline": str(pipeline), "pipeline_hash": folder_hash(pipeline), "data": str(data), "split": split, "n": n,
        "features": features, "metric": fid.metric_name(extractor),
        "extractor_hash": fid.extractor_fingerprint(extractor),
        "image_encoder": str(encoder_dir) if image_features is not None else None,
        "clip_score_model": (str(clip_score_model) if clip_score_model
                             else "project CLIP (text_encoder + image_encoder)"),
        "seed": seed, "real_features_cached": hit, "references": refs, "results": rows,
        "wall_seconds": round(time.perf_counter() - start, 2)}
    if len(rows) == 1:
        result.update({k: v for k, v in rows[0].items() if k not in result})  # metric values at the top level
    return result


def save_evaluation(result: dict[str, Any], out: str | Path, sweep_outputs: bool = False) -> list[Path]:
    """Write ``result`` to the JSON file ``out``; ``sweep_outputs`` adds ``out``.csv and plots ``out``_*.png.

    Returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    written = [out]
    if sweep_outputs:
        written.append(sweep.write_csv(result["results"], out.with_suffix(".csv")))
        written += sweep.plot_sweep(result["results"], out.with_suffix(""), result["references"])
    return written
