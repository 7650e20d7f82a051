"""``ldm toy --out DIR``: the 2-D swiss-roll diffusion of the lecture notes, every sampler side by side.

With ``--score-views`` (the default) it also writes ``score_views.png``: a VE model trained by denoising score
matching, sampled with annealed Langevin and VE predictor-corrector, and the PF-ODE density of the VP model beside
the true density (``ldm.evaluation.swiss_roll.score_views``).

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
                        help="samplers to plot; all of them when omitted (ddpm ddim dpmpp-2m euler euler-a heun lcm "
                             "langevin pc)")
    parser.add_argument("--steps", nargs="+", type=checks.int_at_least(1), default=[5, 10, 25, 50],
                        help="sampling step counts (figure columns)")
    parser.add_argument("--train-steps", type=checks.int_at_least(1), default=4000, help="optimizer steps for the MLP")
    parser.add_argument("--samples", type=checks.int_at_least(2), default=2000, help="points drawn per panel")
    parser.add_argument("--schedule", default="scaled_linear", help="noise schedule: linear, scaled_linear or cosine")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, training and sampling")
    parser.add_argument("--score-views", action=argparse.BooleanOptionalAction, default=True,
                        help="also train a VE model and draw score_views.png: annealed Langevin, VE "
                             "predictor-corrector and the PF-ODE density beside the true density")
    parser.add_argument("--langevin-levels", type=checks.int_at_least(1), default=20,
                        help="noise levels of annealed Langevin (geometric)")
    parser.add_argument("--langevin-steps", type=checks.int_at_least(1), default=100, help="Langevin steps per level")
    parser.add_argument("--pc-steps", type=checks.int_at_least(1), default=200,
                        help="predictor steps of VE predictor-corrector")
    parser.add_argument("--density-grid", type=checks.int_at_least(2), default=100,
                        help="grid points per side of the PF-ODE density map")
    parser.add_argument("--ode-steps", type=checks.int_at_least(1), default=40,
                        help="RK4 steps of the PF-ODE likelihood")
    parser.add_argument("--gaussian-table", action="store_true",
                        help="also compute mean/variance errors of every sampler on Gaussian data with the exact model")
    parser.add_argument("--table-std", type=checks.float_in(1e-6), default=1.0, help="data std of the Gaussian table")
    parser.add_argument("--table-samples", type=checks.int_at_least(2), default=100_000,
                        help="Monte-Carlo samples for stochastic samplers in the table")
    parser.add_argument("--table-spacing", default="trailing",
                        help="timestep spacing for the table: trailing, leading, linspace or karras")


def run(args: argparse.Namespace) -> int:
    """Train, sample, plot; optionally write the Gaussian error table. Returns the exit code."""
    import torch

    from ldm.diffusion import toy
    from ldm.diffusion.samplers import SAMPLERS
    from ldm.diffusion.schedules import SCHEDULES, SPACINGS
    from ldm.evaluation.swiss_roll import run_toy
    from ldm.table import format_table

    checks.one_of("--samplers", args.samplers or [], SAMPLERS)
    checks.one_of("--schedule", [args.schedule], SCHEDULES)
    checks.one_of("--table-spacing", [args.table_spacing], SPACINGS)
    checks.output_dir("--out", args.out)
    torch.set_num_threads(1)  # tiny tensors: extra threads cost more than they give (and the machine may be shared)
    score_options = {"langevin_levels": args.langevin_levels, "langevin_steps": args.langevin_steps,
                     "pc_steps": args.pc_steps, "grid": args.density_grid, "ode_steps": args.ode_steps}
    metrics = run_toy(args.out, samplers=args.samplers, step_counts=args.steps, train_steps=args.train_steps,
                      n_samples=args.samples, seed=args.seed, schedule_name=args.schedule,
                      score=args.score_views, score_options=score_options)
    print(f"trained {metrics['train_steps']} steps in {metrics['train_seconds']:.1f} s wall, "
          f"{metrics['train_cpu_seconds']:.1f} s CPU (final loss {metrics['final_loss']:.3f})")
    print(f"wrote {args.out / 'swiss_roll.png'} and {args.out / 'metrics.json'}")
    if args.score_views:
        sv = metrics["score_views"]
        print(f"score views: Langevin SW {sv['swd']['langevin']}, VE-PC SW {sv['swd']['ve-pc']}; held-out NLL "
              f"{sv['ode_nll_nats']} nats (PF-ODE) vs {sv['true_nll_nats']} (true density at τ=0) -> "
              f"{args.out / 'score_views.png'}")
    if args.gaussian_table:
        rows = toy.gaussian_error_table(std=args.table_std, n=args.table_samples, spacing=args.table_spacing,
                                        seed=args.seed)
        display = toy.error_table_rows(rows)
        table = format_table(display, [(k, k, "") for k in display[0]], markdown=True)
        header = (f"Mean / variance error in % for x0 ~ N(0.5, {args.table_std}²), exact model, "
                  f"{args.table_spacing} spacing, scaled_linear T=1000; "
                  f"(MC) rows use {args.table_samples} samples.\n\n")
        (args.out / "gaussian_errors.md").write_text(header + table + "\n")
        (args.out / "gaussian_errors.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(table)
    return 0
