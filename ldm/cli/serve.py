"""``ldm serve``: a local web page for text-to-image, img2img and inpainting (``ldm.serve``)."""

from __future__ import annotations

import argparse

HELP = "serve a local web page to generate and edit images with a pipeline (needs the 'serve' extra)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="checkpoints/shapes/pipeline", help="pipeline folder to serve")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="TCP port")
    parser.add_argument("--classifier", default=None, help="optional noisy-latent classifier part for guidance")
    parser.add_argument("--max-steps", type=int, default=100, help="largest number of sampling steps a request may ask")
    parser.add_argument("--max-images", type=int, default=8, help="largest number of images a request may ask")
    parser.add_argument("--max-size", type=int, default=512, help="largest image side a request may ask, in pixels")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    from ldm.serve import Limits, serve

    serve(args.pipeline, host=args.host, port=args.port, device=args.device, classifier=args.classifier,
          limits=Limits(max_steps=args.max_steps, max_images=args.max_images, max_size=args.max_size))
    return 0
