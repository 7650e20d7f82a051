"""``ldm bench profile``: where the denoiser's time goes, ours beside diffusers' ``UNet2DConditionModel``.

    ldm bench profile --config mid --kind train      # the operators taking the most self CPU time, both models

Both models run the same config, weights and batch as the ``denoiser`` rows of ``ldm bench`` (``ldm.bench.suite``);
each is run under ``torch.profiler`` for a few steps after warm-up, and the operators are summed by name (self
time: the time inside the operator itself, not its children). Ours runs the fast path ``ldm.fastpath`` chooses
(or ``--precision``), diffusers in fp32. The table shows each side's share of its own total, per step in ms.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ldm.fastpath import (
    REFERENCE,
    FastPath,
    choose,
    denoiser_workload,
    forward_memory,
    forward_probe,
    train_step_probe,
)


def profile_steps(step: Any, steps: int, warmup: int) -> dict[str, float]:
    """Self CPU milliseconds per step of each operator over ``steps`` calls of ``step`` (after ``warmup``)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Profile ours and diffusers (see the module docstring); the JSON-able result with ``rows`` and ``table``."""
    from ldm.bench.suite import Contender, Settings, denoiser_configs, diffusers_call, make_batch, ours_call, unet_pair
    from ldm.table import format_table

    s = Settings(batch=args.batch, tiny=args.tiny)
    config, size = denoiser_configs(s)[args.config]
    ours, theirs = unet_pair(config, "cpu")
    data = make_batch(config, s.batch, size, s.tokens, "cpu")
    if args.precision == "auto":
        probe = (train_step_probe(ours, data["x"], data["t"], data["cond"]) if args.kind == "train"
                 else forward_probe(ours.eval(), data["x"], data["t"], data["cond"]))
        memory = None if args.kind == "train" else forward_memory(ours, data["x"], data["t"], data["cond"])
        fast = choose("auto", denoiser_workload(ours, data["x"], data["cond"],
                                                "train" if args.kind == "train" else "sample"), probe, "cpu",
                      memory=memory)
    else:
        fast = REFERENCE if args.precision == "fp32" else FastPath(args.precision, "sdpa")
    sides = {"ours": Contender(ours, ours_call, data, fast), "diffusers": Contender(theirs, diffusers_call, data)}
    per_op = {name: profile_steps(c.train if args.kind == "train" else c.forward, args.steps, args.warmup)
              for name, c in sides.items()}
    totals = {name: sum(ops.values()) for name, ops in per_op.items()}
    names = sorted(set(per_op["ours"]) | set(per_op["diffusers"]),
                   key=lambda k: -max(per_op["ours"].get(k, 0.0), per_op["diffusers"].get(k, 0.0)))[:args.top]
    rows = [{"op": k, "ours_ms": per_op["ours"].get(k), "ours_share": per_op["ours"].get(k, 0.0) / totals["ours"],
             "diffusers_ms": per_op["diffusers"].get(k),
             "diffusers_share": per_op["diffusers"].get(k, 0.0) / totals["diffusers"]} for k in names]
    rows.append({"op": "total (all operators)", "ours_ms": totals["ours"], "ours_share": 1.0,
                 "diffusers_ms": totals["diffusers"], "diffusers_share": 1.0})
    columns = [("op", "operator (self CPU time)", ""), ("ours_ms", "ours ms/step", ".1f"),
               ("ours_share", "ours %", lambda r: f"{100 * r['ours_share']:.1f}"),
               ("diffusers_ms", "diffusers ms/step", ".1f"),
               ("diffusers_share", "diffusers %", lambda r: f"{100 * r['diffusers_share']:.1f}")]
    return {"benchmark": "profile", "config": args.config, "kind": args.kind, "batch": s.batch, "ran_as": fast.name,
            "threads": torch.get_num_threads(), "steps": args.steps, "rows": rows,
            "table": format_table(rows, columns), "markdown": format_table(rows, columns, markdown=True)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``ldm bench profile``."""
    from ldm.cli import checks

    parser.add_argument("--config", choices=("shapes", "mid"), default="mid", help="the denoiser config (as in the "
                        "denoiser rows of `ldm bench`)")
    parser.add_argument("--kind", choices=("train", "forward"), default="train",
                        help="training step (forward + backward + AdamW) or inference forward")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "mixed"), default="auto",
                        help="ours: the measured fast path (auto) or a fixed one; diffusers always runs fp32")
    parser.add_argument("--batch", type=checks.int_at_least(1), default=32, help="images per step")
    parser.add_argument("--steps", type=checks.int_at_least(1), default=3, help="profiled steps per model")
    parser.add_argument("--warmup", type=checks.int_at_least(0), default=1, help="unprofiled steps first")
    parser.add_argument("--top", type=checks.int_at_least(1), default=15, help="operators shown")
    parser.add_argument("--tiny", action="store_true", help="tiny models: checks the plumbing in seconds")
    parser.add_argument("--out", default="checkpoints/bench/profile.json", help="JSON results file")
