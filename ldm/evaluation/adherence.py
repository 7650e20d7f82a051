"""Prompt adherence on shapes: generate from balanced single-object prompts, read the images back with the
shapes probe, and count how often colour, shape and position (and all three together) are right; and from
two-object prompts (``shapes.pair_eval_prompts``), read back with the two-object detector
(``ldm.evaluation.pair_detector``): both objects present in their colours, each colour bound to its shape, the
relation right, all together."""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

from ldm import table
from ldm.data.shapes import eval_prompts, pair_eval_prompts
from ldm.evaluation.pair_detector import PairDetector, pair_adherence
from ldm.evaluation.shapes_probe import ShapesProbe, adherence
from ldm.pipeline import TextToImagePipeline
from ldm.table import percent

GRID_PROMPTS, GRID_IMAGES_PER_PROMPT = 40, 4  # `ldm adherence --grid/--pair-grid`: the first 40 prompts, 4 images each


def measure_adherence(pipe: TextToImagePipeline, probe: ShapesProbe, n: int = 200, steps: int = 20,
                      guidance: float = 4.0, sampler: str = "dpmpp-2m", seed: int = 0, batch_size: int = 100,
                      progress: bool = False) -> dict[str, Any]:
    """Adherence of ``pipe`` on ``n`` eval prompts (``shapes.eval_prompts(n, seed)``), one image each."""
    prompts = eval_prompts(n, seed)
    start = time.perf_counter()
    images = pipe.generate([p for p, _ in prompts], steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                           batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    scores = adherence(probe.predict(images.to(next(probe.parameters()).device)), [t for _, t in prompts])
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "seed": seed, **scores,
            "seconds": round(seconds, 2), "img_per_s": round(n / max(seconds, 1e-9), 1)}


def measure_pair_adherence(pipe: TextToImagePipeline, detector: PairDetector, n: int = 200, steps: int = 20,
                           guidance: float = 4.0, sampler: str = "dpmpp-2m", seed: int = 0, batch_size: int = 100,
                           progress: bool = False) -> dict[str, Any]:
    """Two-object adherence of ``pipe`` on ``n`` prompts (``shapes.pair_eval_prompts(n, seed)``), one image each:
    ``pair_present`` / ``pair_bound`` / ``pair_relation`` / ``pair_all`` / ``pair_cells`` / ``pair_extra``
    (:func:`ldm.evaluation.pair_detector.pair_adherence`)."""
    prompts = pair_eval_prompts(n, seed)
    start = time.perf_counter()
    images = pipe.generate([p for p, _ in prompts], steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                           batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    scores = pair_adherence(detector.detect(images), [t for _, t in prompts])
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "seed": seed, "pair_n": scores.pop("n"),
            **{f"pair_{k}": v for k, v in scores.items()}, "pair_seconds": round(seconds, 2)}


def sweep_adherence(pipe: TextToImagePipeline, probe: ShapesProbe, steps: Sequence[int], guidance: Sequence[float],
                    samplers: Sequence[str], detector: PairDetector | None = None, pair_n: int = 200,
                    **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`measure_adherence` over the grid samplers × steps × guidance; with a ``detector``, each row also
    holds :func:`measure_pair_adherence` on ``pair_n`` two-object prompts."""
    rows = []
    for name, s, g in itertools.product(samplers, steps, guidance):
        row = measure_adherence(pipe, probe, steps=s, guidance=g, sampler=name, **kwargs)
        if detector is not None and pair_n > 0:
            row.update(measure_pair_adherence(pipe, detector, n=pair_n, steps=s, guidance=g, sampler=name,
                                              **{k: v for k, v in kwargs.items() if k != "n"}))
        rows.append(row)
    return rows


ADHERENCE_COLUMNS = [("sampler", "sampler", ""), ("steps", "steps", ""), ("guidance", "guid.", "g"),
                     ("color", "colour", percent("color")), ("shape", "shape", percent("shape")),
                     ("position", "position", percent("position")), ("size", "size", percent("size")),
                     ("all_three", "all 3", percent("all_three")), ("img_per_s", "img/s", "")]


PAIR_COLUMNS = [("sampler", "sampler", ""), ("steps", "steps", ""), ("guidance", "guid.", "g"),
                ("pair_present", "both present", percent("pair_present")),
                ("pair_bound", "bound", percent("pair_bound")), ("pair_relation", "relation", percent("pair_relation")),
                ("pair_all", "all", percent("pair_all")), ("pair_cells", "cells", percent("pair_cells")),
                ("pair_extra", "extra obj.", percent("pair_extra"))]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The adherence rows as a table (percentages); rows with two-object figures add a second table."""
    text = table.format_table(rows, ADHERENCE_COLUMNS)
    pairs = [r for r in rows if "pair_all" in r]
    if pairs:
        text += (f"\n\ntwo objects ({pairs[0]['pair_n']} prompts; both present in their colours, each colour bound "
                 f"to its shape, relation right, all three; both in their named cells, of the placed prompts; "
                 f"a third colour drawn):\n" + table.format_table(pairs, PAIR_COLUMNS))
    return text
