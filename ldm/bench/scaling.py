"""The ``scaling`` group of ``ldm bench``: the shapes training step at four batch sizes, ours beside diffusers, and
each side's step time split into what grows with the batch and what does not.

Per side the medians of the interleaved rounds are fitted by least squares to ``time(b) = fixed + per_image * b``
over the batches (``b/4, b/2, b, 2b`` of the run's ``--batch``: 8-64 by default). ``per_image`` is the arithmetic
the batch brings (convolutions, GEMMs, elementwise work over more pixels); ``fixed`` is what every step pays whatever
its batch: the 13,000-16,000 operator calls (views included) of a shapes forward + backward + AdamW (dispatch, oneDNN
primitive set-up and weight reorders, allocation, OpenMP fork/join) and the optimizer's pass over the weights. A
speedup that grows with the batch says the fixed part, the same library calls on both sides, is what holds the ratio
down at the small batch.
At every batch ours runs the fast path ``ldm.fastpath`` chooses for the training step at the run's ``--batch`` (the
denoiser row's choice), diffusers fp32; ``ours fp32`` gives the same-precision ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ldm.bench.suite import Settings


def fit_line(batches: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(fixed, per_image)`` of ``seconds ≈ fixed + per_image * batch`` (at least two batches)."""
    if len(batches) != len(seconds) or len(set(batches)) < 2:
        raise ValueError("fit_line needs at least two different batch sizes, one time each")
    n = len(batches)
    mean_b, mean_s = sum(batches) / n, sum(seconds) / n
    cov = sum((b - mean_b) * (s - mean_s) for b, s in zip(batches, seconds, strict=True))
    var = sum((b - mean_b) ** 2 for b in batches)
    per_image = cov / var
    return mean_s - per_image * mean_b, per_image


def scaling_batches(batch: int) -> list[int]:
    """The batches of the group: a quarter, half, one and two times ``batch`` (distinct, at least 1)."""
    return sorted({max(1, batch * k // 4) for k in (1, 2, 4, 8)})


def scaling_rows(s: Settings, ctx: dict) -> list[dict[str, Any]]:
    """One row per batch (img/s, speedup vs diffusers) and the fit's row (ms per image, the fixed ms in the note)."""
    from ldm.bench.measure import interleaved, round_range
    from ldm.bench.suite import (
        Contender,
        denoiser_configs,
        diffusers_call,
        make_batch,
        ours_call,
        ratio,
        unet_pair,
    )
    from ldm.fastpath import REFERENCE, choose, denoiser_workload, train_step_probe

    config, size = denoiser_configs(s)["shapes"]
    ours, theirs = unet_pair(config, s.device)
    probe = make_batch(config, s.batch, size, s.tokens, s.device)
    fast = choose("auto", denoiser_workload(ours, probe["x"], probe["cond"], "train"),
                  train_step_probe(ours, probe["x"], probe["t"], probe["cond"]), s.device)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=True)
    batches = scaling_batches(s.batch)
    medians: dict[str, list[float]] = {"ours": [], "ours fp32": [], "diffusers": []}
    rows = []
    for b in batches:
        data = make_batch(config, b, size, s.tokens, s.device)
        sides = {"ours": Contender(ours, ours_call, data, fast, s.device, opt),
                 "ours fp32": Contender(ours, ours_call, data, REFERENCE, s.device, opt),
                 "diffusers": Contender(theirs, diffusers_call, data, REFERENCE, s.device, their_opt)}
        times = interleaved({k: c.train for k, c in sides.items()}, s.rounds, s.warmup, s.device)
        for k in medians:
            medians[k].append(times[k]["wall_s"])
        rows.append({"group": "scaling", "row": f"train step shapes b{b}", "unit": "img/s",
                     "ours": b / times["ours"]["wall_s"], "reference": b / times["diffusers"]["wall_s"],
                     "speedup": ratio(times["diffusers"]["wall_s"], times["ours"]["wall_s"]),
                     "speedup_range": round_range(times["diffusers"], times["ours"]),
                     "cpu_speedup": ratio(times["diffusers"]["cpu_s"], times["ours"]["cpu_s"]),
                     "same_precision_speedup": ratio(times["diffusers"]["wall_s"], times["ours fp32"]["wall_s"]),
                     "ran_as": fast.name, "times": times, "batch": b, "note": ""})
    fits = {k: fit_line(batches, v) for k, v in medians.items()}
    if min(f[1] for f in fits.values()) <= 0:  # a time that does not grow with the batch: noise, no split to show
        rows[-1]["note"] = "no fit: the step time did not grow with the batch on every side (noise)"
        return rows
    (fixed, per), (fixed_ref, per_ref), (fixed_fp32, per_fp32) = fits["ours"], fits["diffusers"], fits["ours fp32"]
    rows.append({"group": "scaling", "row": f"train step shapes, per image (fit over b{batches[0]}-b{batches[-1]})",
                 "unit": "ms/img", "ours": per * 1e3, "reference": per_ref * 1e3, "speedup": per_ref / per,
                 "ran_as": fast.name, "fixed_s": {k: f[0] for k, f in fits.items()},
                 "per_image_s": {k: f[1] for k, f in fits.items()},
                 "note": f"fixed per step (any batch): ours {fixed * 1e3:.0f} ms (in fp32 {fixed_fp32 * 1e3:.0f}), "
                         f"diffusers {fixed_ref * 1e3:.0f} ms; per image both fp32: {per_ref / per_fp32:.2f}x"})
    return rows
