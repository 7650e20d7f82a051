"""The ``scaling`` group of ``ldm bench``: the shapes training step and forward at four batch sizes, ours beside
diffusers, and each side's time split into what grows with the batch and what does not.

Per side the medians of the interleaved rounds are fitted by least squares to ``time(b) = fixed + per_image * b``
over the batches (``b/4, b/2, b, 2b`` of the run's ``--batch``: 8-64 by default). ``per_image`` is the arithmetic
the batch brings (convolutions, GEMMs, elementwise work over more pixels); ``fixed`` is what every call pays whatever
its batch: the 13,000-16,000 operator calls (views included) of a shapes training step (dispatch, oneDNN primitive
set-up and weight reorders, allocation, OpenMP fork/join) and the optimizer's pass over the weights. A speedup that
grows with the batch says the fixed part, the same library calls on both sides, is what holds the ratio down at the
small batch; for the forward the per-image part's GFLOP/s is set against the kernels' peak (the forward goal's
measure without the fixed part). At every batch ours runs the fast path ``ldm.fastpath`` chooses at the run's
``--batch`` (the denoiser rows' choices), diffusers fp32; ``ours fp32`` gives the same-precision ratio.
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
    """Per kind (training step, forward): one row per batch (img/s, speedup vs diffusers) and the fit's row (ms per
    image; the fixed ms, and for the forward the per-image part's GFLOP/s against the kernels' peak, in the note)."""
    from ldm.bench.measure import interleaved
    from ldm.bench.suite import (
        Contender,
        default_paths,
        denoiser_configs,
        denoiser_flops,
        diffusers_call,
        make_batch,
        ours_call,
        unet_pair,
    )
    from ldm.fastpath import REFERENCE

    config, size = denoiser_configs(s)["shapes"]
    ours, theirs = unet_pair(config, s.device)
    probe = make_batch(config, s.batch, size, s.tokens, s.device)
    paths = dict(zip(("train step", "forward"), default_paths(ours, probe, s.device), strict=True))
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=True)
    batches = scaling_batches(s.batch)
    times: dict[str, list[dict[str, Any]]] = {kind: [] for kind in paths}
    for b in batches:
        data = make_batch(config, b, size, s.tokens, s.device)
        for kind, fast in paths.items():
            sides = {"ours": Contender(ours, ours_call, data, fast, s.device, opt),
                     "ours fp32": Contender(ours, ours_call, data, REFERENCE, s.device, opt),
                     "diffusers": Contender(theirs, diffusers_call, data, REFERENCE, s.device, their_opt)}
            calls = {k: c.train if kind == "train step" else c.forward for k, c in sides.items()}
            times[kind].append(interleaved(calls, s.rounds, s.warmup, s.device))
    gflop_per_img = denoiser_flops(ours, probe) / s.batch / 1e9
    peak = ctx.get("peak", {}).get("peak_gflops", {}).get("float32")
    rows = []
    for kind, fast in paths.items():
        kind_rows = [_batch_row(kind, b, times_b, fast.name) for b, times_b in zip(batches, times[kind], strict=True)]
        fit = _fit_row(kind, batches, times[kind], fast.name, gflop_per_img if kind == "forward" else None, peak)
        if fit is None:
            kind_rows[-1]["note"] = "no fit: the time did not grow with the batch on every side (noise)"
        rows += kind_rows + ([fit] if fit else [])
    return rows


def _batch_row(kind: str, batch: int, times: dict[str, Any], ran_as: str) -> dict[str, Any]:
    from ldm.bench.measure import round_range
    from ldm.bench.suite import ratio

    return {"group": "scaling", "row": f"{kind} shapes b{batch}", "unit": "img/s",
            "ours": batch / times["ours"]["wall_s"], "reference": batch / times["diffusers"]["wall_s"],
            "speedup": ratio(times["diffusers"]["wall_s"], times["ours"]["wall_s"]),
            "speedup_range": round_range(times["diffusers"], times["ours"]),
            "cpu_speedup": ratio(times["diffusers"]["cpu_s"], times["ours"]["cpu_s"]),
            "same_precision_speedup": ratio(times["diffusers"]["wall_s"], times["ours fp32"]["wall_s"]),
            "ran_as": ran_as, "times": times, "batch": batch, "note": ""}


def _fit_row(kind: str, batches: list[int], times: list[dict[str, Any]], ran_as: str,
             gflop_per_img: float | None, peak_gflops: float | None) -> dict[str, Any] | None:
    """The fit's row of one kind; None when some side's time did not grow with the batch (noise: nothing to split)."""
    fits = {side: fit_line(batches, [t[side]["wall_s"] for t in times]) for side in ("ours", "ours fp32", "diffusers")}
    if min(per for _, per in fits.values()) <= 0:
        return None
    (fixed, per), (fixed_ref, per_ref), (fixed_fp32, per_fp32) = fits["ours"], fits["diffusers"], fits["ours fp32"]
    call = "step" if kind == "train step" else "call"
    note = (f"fixed per {call} (any batch): ours {fixed * 1e3:.0f} ms (in fp32 {fixed_fp32 * 1e3:.0f}), diffusers "
            f"{fixed_ref * 1e3:.0f} ms; per image both fp32: {per_ref / per_fp32:.2f}x")
    row: dict[str, Any] = {"group": "scaling", "unit": "ms/img",
                           "row": f"{kind} shapes, per image (fit over b{batches[0]}-b{batches[-1]})",
                           "ours": per * 1e3, "reference": per_ref * 1e3, "speedup": per_ref / per, "ran_as": ran_as,
                           "fixed_s": {k: f[0] for k, f in fits.items()},
                           "per_image_s": {k: f[1] for k, f in fits.items()}}
    if gflop_per_img is not None:
        row["per_image_gflops"] = gflop_per_img / per
        note += f"; the per-image part at {row['per_image_gflops']:.0f} GFLOP/s"
        if peak_gflops:
            row["per_image_pct_fp32_peak"] = row["per_image_gflops"] / peak_gflops
            note += f" = {100 * row['per_image_pct_fp32_peak']:.0f} % of the fp32 peak"
    row["note"] = note
    return row
