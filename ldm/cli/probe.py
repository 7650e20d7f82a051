"""``ldm probe``: train the shapes probe (the classifier that reads colour, shape, size and position back)."""

from __future__ import annotations

import argparse

from ldm.cli import checks

HELP = "train the shapes probe on a shapes dataset and export it (config.json + model.safetensors + metrics.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="datasets/shapes", help="shapes dataset (ldm data shapes)")
    parser.add_argument("--out", default="checkpoints/shapes/parts/probe", help="export folder")
    parser.add_argument("--steps", type=checks.int_at_least(1), default=800, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace) -> int:
    checks.shard_dataset("--data-dir", args.data_dir, ["train", "val"])
    checks.output_dir("--out", args.out)
    from ldm.evaluation.shapes_probe import train_probe

    train_probe(args.data_dir, args.out, steps=args.steps, seed=args.seed)
    print(f"wrote {args.out}")
    return 0
