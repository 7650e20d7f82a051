"""Classifier guidance, classifier-free guidance and both, compared on shapes: prompt adherence (the shapes probe
reads the attributes back) and FD (CLIP image features) against real one-object images, over the scales.

* **CG** (Dhariwal & Nichol 2021, Algorithm 2 in ε-form, ``guidance.classifier_guidance``): the *unconditional*
  model (prompt "", the CFG-dropout branch of the same denoiser) guided by the noisy-latent classifier towards
  the prompt's colour, shape, position and size with scale s;
* **CFG** (Ho & Salimans 2022, eq. 6): the prompt with guidance weight w;
* **CFG+CG**: the prompt with weight w, plus the classifier with scale s.

The classifier's own accuracy on noisy validation latents, per label and timestep, is measured too
(:func:`classifier_accuracy`): guidance can only be as good as p_φ(y | z_t) is where it acts.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch
from torch import nn

from ldm import table
from ldm.data.latents import LatentDataset
from ldm.data.shapes import eval_prompts
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.evaluation.fid import extract_features, frechet_distance, load_split, to_uint8
from ldm.evaluation.shapes_probe import ShapesProbe, adherence
from ldm.table import percent

GUIDED_LABELS = ("color", "shape", "position", "size")


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, cache_dir: str, schedule: DiscreteSchedule,
                        timesteps: Sequence[int] = (0, 250, 500, 750, 999), split: str = "val", seed: int = 0,
                        batch_size: int = 500) -> list[dict[str, Any]]:
    """Accuracy of each label head on the cache's ``split`` latents noised to each t (one row per t; seeded)."""
    data = LatentDataset(cache_dir, split)
    names = list(data.label_classes)
    own = classifier.config.labels
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for t_val in timesteps:
        correct = {n: 0 for n in names}
        count = {n: 0 for n in names}
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            batch = data.__getitems__(idx)
            z0 = batch["latent_mean"] + batch["latent_std"] * torch.randn(batch["latent_mean"].shape, generator=gen)
            t = torch.full((len(idx),), t_val, dtype=torch.long)
            z_t = schedule.q_sample(z0, t, torch.randn(z0.shape, generator=gen))
            logits = classifier(z_t, t.float())
            for a, name in enumerate(names):
                y = batch["labels"][:, a]
                known = y >= 0
                # the cache and the classifier may order the classes differently: compare names
                predicted = [own[name][i] for i in logits[name].argmax(1)[known].tolist()]
                wanted = [data.label_classes[name][i] for i in y[known].tolist()]
                correct[name] += sum(p == w for p, w in zip(predicted, wanted))
                count[name] += len(wanted)
        rows.append({"t": t_val, **{n: correct[n] / max(count[n], 1) for n in names}})
    return rows


def real_one_object_images(data_dir: str, n: int, resolution: int = 32, split: str = "val") -> torch.Tensor:
    """The first ``n`` one-object images of a shapes split (uint8), the FD reference for one-object prompts."""
    real = load_split(data_dir, split, min(4 * n, 2000), resolution)
    keep = [i for i, m in enumerate(real.metas) if len(m.get("objects") or []) == 1][:n]
    if len(keep) < n:
        raise ValueError(f"{data_dir} {split} has only {len(keep)} one-object images among its first samples")
    return real.images[keep]


def guidance_point(pipe: Any, probe: ShapesProbe, extractor: nn.Module, real_features: torch.Tensor,
                   method: str, cfg: float, scale: float, classifier: nn.Module | None, n: int = 300,
                   steps: int = 20, sampler: str = "dpmpp-2m", seed: int = 0, batch_size: int = 100) -> dict[str, Any]:
    """One row: generate ``n`` eval prompts with ``method`` ("cg", "cfg", "cfg+cg") and measure it."""
    prompts = eval_prompts(n, seed)
    targets = [t for _, t in prompts]
    text = ["" if method == "cg" else p for p, _ in prompts]
    labels = [{k: t[k] for k in GUIDED_LABELS} for t in targets]
    use_cg = method != "cfg" and scale > 0
    start, cpu = time.perf_counter(), time.process_time()
    images = pipe.generate(text, steps=steps, guidance=1.0 if method == "cg" else cfg, sampler=sampler, seed=seed,
                           batch_size=batch_size, progress=False, classifier=classifier if use_cg else None,
                           classifier_scale=scale if use_cg else 0.0, classifier_labels=labels if use_cg else None)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    scores = adherence(probe.predict(images), targets)
    fake = extract_features(extractor, to_uint8(images))
    return {"method": method, "cfg": 1.0 if method == "cg" else cfg, "scale": scale if method != "cfg" else 0.0,
            **{k: scores[k] for k in (*GUIDED_LABELS, "all_three")}, "fd_clip": frechet_distance(real_features, fake),
            "n": n, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1)}


def compare_guidance(pipe: Any, probe: ShapesProbe, classifier: nn.Module, extractor: nn.Module, data_dir: str,
                     n: int = 300, cg_scales: Sequence[float] = (1, 2, 4, 8), cfg_scales: Sequence[float] = (1, 2, 4),
                     both: Sequence[tuple[float, float]] = ((2, 1), (2, 4), (4, 1), (4, 4)), steps: int = 20,
                     sampler: str = "dpmpp-2m", seed: int = 0, log: Any = print) -> dict[str, Any]:
    """The whole comparison: rows for CG alone (the unconditional model, s = 0 included), CFG alone and both, and
    the FD floor (real val one-object images vs real train ones, same n)."""
    real = real_one_object_images(data_dir, n)
    real_features = extract_features(extractor, real)
    floor = frechet_distance(real_features, extract_features(extractor, real_one_object_images(data_dir, n,
                                                                                                split="train")))
    points = ([("cg", 1.0, s) for s in (0, *cg_scales)] + [("cfg", w, 0.0) for w in cfg_scales]
              + [("cfg+cg", w, s) for w, s in both])
    rows = []
    for method, w, s in points:
        row = guidance_point(pipe, probe, extractor, real_features, method, w, s, classifier, n, steps, sampler, seed)
        rows.append(row)
        if log:
            log(format_table([row]).splitlines()[-1])
    return {"rows": rows, "fd_clip_real_train_vs_val": floor, "loadavg": os.getloadavg()}


COLUMNS = [("method", "method", ""), ("cfg", "CFG w", "g"), ("scale", "CG s", "g"),
           ("color", "colour", percent("color")), ("shape", "shape", percent("shape")),
           ("position", "position", percent("position")), ("size", "size", percent("size")),
           ("all_three", "all 3", percent("all_three")), ("fd_clip", "FD-CLIP", ".2f"),
           ("seconds", "wall s", ".1f"), ("cpu_seconds", "CPU s", ".1f")]


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    return table.format_table(rows, COLUMNS, markdown=markdown)


ACCURACY_COLUMNS = [("t", "t", "")] + [(a, a, percent(a)) for a in (*GUIDED_LABELS, "background")]


def format_accuracy(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    return table.format_table(rows, ACCURACY_COLUMNS, markdown=markdown)
