"""``ldm serve``: a local web page for text-to-image, img2img and inpainting (``ldm.serve``)."""

from __future__ import annotations

import argparse

from ldm.cli import checks

HELP = "serve a local web page to generate and edit images with a pipeline (needs the 'serve' extra)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="checkpoints/shapes/pipeline", help="pipeline folder to serve")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=checks.int_at_least(1), default=7860, help="TCP port")
    parser.add_argument("--classifier", default=None, help="optional noisy-latent classifier part for guidance")
    parser.add_argument("--max-steps", type=checks.int_at_least(1), default=100,
                        help="largest number of sampling steps a request may ask")
    parser.add_argument("--max-images", type=checks.int_at_least(1), default=8,
                        help="largest number of images a request may ask")
    parser.add_argument("--max-size", type=checks.int_at_least(8), default=512,
                        help="largest image side a request may ask, in pixels")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="load a pipeline whose parts were not trained together (a warning instead of an error)")


def run(args: argparse.Namespace) -> int:
    checks.existing_dir("--pipeline", args.pipeline, "pipeline folder")
    if args.classifier:
        checks.existing_dir("--classifier", args.classifier, "part folder")
    device = checks.torch_device("--device", args.device)
    if args.port > 65535:
        from ldm.errors import UsageError

        raise UsageError(f"--port must be at most 65535, got {args.port}")

    from ldm.serve import Limits, serve

    serve(args.pipeline, host=args.host, port=args.port, device=device, classifier=args.classifier,
          limits=Limits(max_steps=args.max_steps, max_images=args.max_images, max_size=args.max_size),
          allow_mismatch=args.allow_mismatch)
    return 0
