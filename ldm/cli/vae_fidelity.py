"""``ldm vae-fidelity``: how much of the shapes images a VAE keeps (probe-read attributes, PSNR, SSIM)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldm.cli import checks

HELP = "probe-read fidelity, PSNR and SSIM of a VAE's reconstructions of shapes images (JSON on stdout)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", required=True, help="exported VAE part folder or an `ldm fit` checkpoint (.ckpt)")
    parser.add_argument("--probe", default="checkpoints/shapes/parts/probe", help="exported shapes probe (ldm probe)")
    parser.add_argument("--data-dir", default="datasets/shapes", help="shapes dataset (ldm data shapes)")
    parser.add_argument("--split", default="val", help="split to reconstruct (train or val)")
    parser.add_argument("--n", type=checks.int_at_least(1), default=None,
                        help="first N single-object images (default: all)")
    parser.add_argument("--out", default=None, help="also write the result to this JSON file")


def run(args: argparse.Namespace) -> int:
    if not Path(args.vae).is_dir():
        checks.existing_file("--vae", args.vae)
    checks.existing_dir("--probe", args.probe, "probe part folder (train one with `ldm probe`)")
    checks.shard_dataset("--data-dir", args.data_dir, [args.split])
    if args.out is not None:
        checks.output_file("--out", args.out, (".json",))
    from ldm.evaluation.shapes_probe import load_probe
    from ldm.evaluation.vae_fidelity import load_vae, reconstruction_fidelity

    result = reconstruction_fidelity(load_vae(args.vae), load_probe(args.probe), args.data_dir, args.n, args.split)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0
