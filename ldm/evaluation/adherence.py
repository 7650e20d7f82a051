"""Prompt adherence on shapes: generate from balanced single-object prompts, read the images back with the
shapes probe, and count how often colour, shape and position (and all three together) are right."""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

from ldm import table
from ldm.data.shapes import eval_prompts
from ldm.table import percent
from ldm.evaluation.shapes_probe import ShapesProbe, adherence
from ldm.pipeline import TextToImagePipeline


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


def sweep_adherence(pipe: TextToImagePipeline, probe: ShapesProbe, steps: Sequence[int], guidance: Sequence[float],
                    samplers: Sequence[str], **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`measure_adherence` over the grid samplers × steps × guidance."""
    return [measure_adherence(pipe, probe, steps=s, guidance=g, sampler=name, **kwargs)
            for name, s, g in itertools.product(samplers, steps, guidance)]


ADHERENCE_COLUMNS = [("sampler", "sampler", ""), ("steps", "steps", ""), ("guidance", "guid.", "g"),
                     ("color", "colour", percent("color")), ("shape", "shape", percent("shape")),
                     ("position", "position", percent("position")), ("size", "size", percent("size")),
                     ("all_three", "all 3", percent("all_three")), ("img_per_s", "img/s", "")]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The adherence rows as a table (percentages)."""
    return table.format_table(rows, ADHERENCE_COLUMNS)
