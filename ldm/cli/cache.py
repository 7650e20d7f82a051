"""``ldm cache``: encode a shard dataset once with the frozen VAE and text encoder (see ldm.data.latents)."""

from __future__ import annotations

import argparse
import time

from ldm.cli import checks
from ldm.errors import UsageError

HELP = "precompute VAE latents + text-token embeddings of a dataset so U-Net training skips both encoders"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", required=True,
                        help="exported VAE part folder (from `ldm export`, e.g. checkpoints/shapes/parts/vae)")
    parser.add_argument("--text-encoder", required=True,
                        help="exported text-encoder part folder (e.g. checkpoints/shapes/parts/text_encoder)")
    parser.add_argument("--data", required=True,
                        help="shard dataset folder with train/ and val/ (e.g. datasets/shapes)")
    parser.add_argument("--out", required=True, help="cache folder to write (e.g. checkpoints/shapes/cache)")
    parser.add_argument("--resolution", type=checks.int_at_least(1), default=32,
                        help="image size the shards are decoded at")
    parser.add_argument("--splits", type=checks.comma_list(str), default="train,val",
                        help="comma-separated splits to encode")
    parser.add_argument("--batch-size", type=checks.int_at_least(1), default=256,
                        help="images encoded per forward pass")
    parser.add_argument("--max-samples", type=checks.int_at_least(1), default=None,
                        help="encode at most this many samples per split, the first in shard order (default: all); "
                             "a short training sees only a fraction of a large dataset")
    parser.add_argument("--buckets", action="store_true",
                        help="aspect-ratio buckets of about RESOLUTION² pixels instead of square crops, one bucket per "
                             "chunk (the dataset's info.json buckets when `ldm data folder --buckets` recorded them)")
    parser.add_argument("--bucket-step", type=checks.int_at_least(1), default=None,
                        help="bucket sides are multiples of this (default 32: an f=4 VAE's factor x 8)")
    parser.add_argument("--labels", default=None,
                        help="labels to store from each sample's json, NAME=PATH,... (e.g. color=objects.only.color; "
                             "'none' for no labels; default: the dataset's own, for shapes its attributes)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    checks.existing_dir("--vae", args.vae, "part folder")
    checks.existing_dir("--text-encoder", args.text_encoder, "part folder")
    checks.shard_dataset("--data", args.data, args.splits)
    checks.output_dir("--out", args.out)
    device = checks.torch_device("--device", args.device)

    from ldm.data.latents import build_latent_cache, parse_label_paths
    from ldm.data.registry import benchmark_named
    from ldm.data.shards import read_info
    from ldm.io import load_part

    if args.labels is None:
        benchmark = benchmark_named(read_info(args.data).get("name"))
        labels = benchmark.label_paths() if benchmark is not None else {}
    else:
        try:
            labels = parse_label_paths(args.labels)
        except ValueError as e:
            raise UsageError(f"--labels: {e}") from None
    vae = load_part(args.vae, kind="vae").to(device)
    text_encoder = load_part(args.text_encoder, kind="text_encoder").to(device)
    start = time.perf_counter()
    buckets = None
    if args.buckets or args.bucket_step:
        from ldm.data.buckets import BucketSpec
        from ldm.data.shards import read_info

        recorded = dict(read_info(args.data).get("buckets") or {})
        recorded.pop("list", None)
        if args.bucket_step:
            recorded["step"] = args.bucket_step
        try:
            buckets = BucketSpec.from_config(recorded, args.resolution)
        except ValueError as e:
            raise UsageError(f"--buckets: {e}") from None
    info = build_latent_cache(vae, text_encoder, args.data, args.out, args.resolution, tuple(args.splits),
                              args.batch_size, max_samples=args.max_samples, labels=labels, buckets=buckets)
    seconds = time.perf_counter() - start
    n = sum(s["samples"] for s in info["splits"].values())
    skipped = sum(s["skipped"] for s in info["splits"].values())
    print(f"cached {n} samples ({skipped} skipped) in {seconds:.1f} s "
          f"({n / max(seconds, 1e-9):.0f} img/s) -> {args.out}")
    return 0
