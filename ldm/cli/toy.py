"""``ldm toy --out DIR``: the 2-D swiss-roll diffusion of the lecture notes, every sampler side by side.

Trains a small MLP ε-model on the swiss roll (well under a minute on a CPU), samples it with each
sampler at several step counts and writes ``DIR/swiss_roll.png`` (data vs samples) and
``DIR/metrics.json`` (sliced Wasserstein distance to held-out data). ``--gaussian-table`` also writes
the exact-Gaussian mean/variance error table of every sampler (``DIR/gaussian_errors.md`` / ``.json``).
Heavy imports happen in :func:`run`, so ``ldm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldm.cli import checks

HELP = "train a 2-D swiss-roll diffusion model (< 1 min on CPU) and plot every sampler at several step counts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ldm toy``."""
    parser.add_argument("--out", type=Path, required=True, help="output folder for swiss_roll.png and metrics.json")
    parser.add_argument("--samplers", nargs="+", default=None,
                        help="samplers to plot; all seven when omitted (ddpm ddim dpmpp-2m euler euler-a heun lcm)")
    parser.add_argument("--steps", nargs="+", type=checks.int_at_least(1), default=[5, 10, 25, 50], help="sampling step counts (figure columns)")
    parser.add_argument("--train-steps", type=checks.int_at_least(1), default=4000, help="optimizer steps for the MLP")
    parser.add_argument("--samples", type=checks.int_at_least(2), default=2000, help="points drawn per panel")
    parser.add_argument("--schedule", default="scaled_linear", help="noise schedule: linear, scaled_linear or cosine")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, training and sampling")
    parser.add_argument("--gaussian-table", action="store_true",
                        help="also compute mean/variance errors of every sampler on Gaussian data with the exact model")
    parser.add_argument("--table-std", type=checks.float_in(1e-6), default=1.0, help="data std of the Gaussian table")
    parser.add_argument("--table-samples", type=checks.int_at_least(2), default=100_000, help="Monte-Carlo samples for stochastic samplers in the table")
    parser.add_argument("--table-spacing", default="trailing", help="timestep spacing for the table: trailing, leading, linspace or karras")


def run(args: argparse.Namespace) -> int:
    """Train, sample, plot; optionally write the Gaussian error table. Returns the exit code."""
    import torch

    from ldm.diffusion import toy
    from ldm.diffusion.samplers import SAMPLERS
    from ldm.evaluation.swiss_roll import run_toy
    from ldm.table import format_table
    from ldm.diffusion.schedules import SCHEDULES, SPACINGS

    checks.one_of("--samplers", args.samplers or [], SAMPLERS)
    checks.one_of("--schedule", [args.schedule], SCHEDULES)
    checks.one_of("--table-spacing", [args.table_spacing], SPACINGS)
    checks.output_dir("--out", args.out)
    torch.set_num_threads(1)  # tiny tensors: extra threads cost more than they give (and the machine may be shared)
    metrics = run_toy(args.out, samplers=args.samplers, step_counts=args.steps, train_steps=args.train_steps,
                      n_samples=args.samples, seed=args.seed, schedule_name=args.schedule)
    print(f"trained {metrics['train_steps']} steps in {metrics['train_seconds']:.1f} s wall, "
          f"{metrics['train_cpu_seconds']:.1f} s CPU (final loss {metrics['final_loss']:.3f})")
    print(f"wrote {args.out / 'swiss_roll.png'} and {args.out / 'metrics.json'}")
    if args.gaussian_table:
        rows = toy.gaussian_error_table(std=args.table_std, n=args.table_samples, spacing=args.table_spacing, seed=args.seed)
        display = toy.error_table_rows(rows)
        table = format_table(display, [(k, k, "") for k in display[0]], markdown=True)
        header = (f"Mean / variance error in % for x0 ~ N(0.5, {args.table_std}²), exact model, {args.table_spacing} spacing, "
                  f"scaled_linear T=1000; (MC) rows use {args.table_samples} samples.\n\n")
        (args.out / "gaussian_errors.md").write_text(header + table + "\n")
        (args.out / "gaussian_errors.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(table)
    return 0
