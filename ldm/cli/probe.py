"""``ldm probe``: train the shapes probe (the classifier that reads colour, shape, size and position back) and the
two-object detector (``PROBE/pair_detector``: both objects' colours, shapes and boxes)."""

from __future__ import annotations

import argparse

from ldm.cli import checks

HELP = ("train the shapes probe on a shapes dataset and the two-object detector on rendered scenes; export both "
        "(config.json + model.safetensors + metrics.json)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="datasets/shapes", help="shapes dataset (ldm data shapes)")
    parser.add_argument("--out", default="checkpoints/shapes/parts/probe", help="export folder")
    parser.add_argument("--steps", type=checks.int_at_least(1), default=800, help="optimizer steps")
    parser.add_argument("--detector-steps", type=checks.int_at_least(0), default=None,
                        help="optimizer steps of the two-object detector, saved in OUT/pair_detector and validated on "
                             "the real val images (default: the detector's own; 0: no detector)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace) -> int:
    checks.shard_dataset("--data-dir", args.data_dir, ["train", "val"])
    checks.output_dir("--out", args.out)
    from ldm.evaluation.shapes_probe import train_probe

    train_probe(args.data_dir, args.out, steps=args.steps, seed=args.seed)
    print(f"wrote {args.out}")
    if args.detector_steps != 0:
        from pathlib import Path

        from ldm.evaluation.pair_detector import DETECTOR_DIR, train_detector

        steps = {} if args.detector_steps is None else {"steps": args.detector_steps}
        train_detector(Path(args.out) / DETECTOR_DIR, val_dir=args.data_dir, seed=args.seed, **steps)
        print(f"wrote {Path(args.out) / DETECTOR_DIR}")
    return 0
