"""``ldm generate``: prompts → a grid PNG (one row per prompt, labelled) plus the single images, each PNG carrying
its generation parameters (``ldm.generation``); ``--from-png`` makes one again. Edits of an ``--init-image``
(img2img, ``--invert``, ``--mask``, ``--colorize``) and classifier guidance are options of the same request."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "generate images from text prompts with an exported pipeline folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ldm.diffusion.samplers import SAMPLERS

    parser.add_argument("--pipeline", default="checkpoints/shapes/pipeline",
                        help="pipeline folder (vae/ text_encoder/ unet/ scheduler/ pipeline.json), written by make train-ldm")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt; repeat the flag for several (each becomes a grid row). '' is unconditional")
    parser.add_argument("--prompts-file", default=None, help="text file with one prompt per line (added to --prompt)")
    parser.add_argument("--negative-prompt", default=None, help="prompt to steer away from (replaces '' in guidance)")
    parser.add_argument("--n", type=int, default=4, help="images per prompt (grid columns)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: pipeline.json's, 20)")
    parser.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="sampler (default: pipeline.json's, dpmpp-2m)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale w (1 = off, 0 = unconditional; default: pipeline.json's)")
    parser.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale φ in [0, 1] (Lin et al. 2024)")
    parser.add_argument("--eta", type=float, default=None, help="stochasticity for ddim (0 = deterministic) and euler-a")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed + prompts = same images")
    parser.add_argument("--height", type=int, default=None, help="image height (multiple of the VAE factor; default: training size)")
    parser.add_argument("--width", type=int, default=None, help="image width (multiple of the VAE factor; default: training size)")
    parser.add_argument("--batch-size", type=int, default=64, help="images sampled together")
    parser.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the grid for viewing")
    parser.add_argument("--out", default="samples.png", help="grid PNG path; single images go to <out stem>/")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    edit = parser.add_argument_group("editing an image (ldm.editing)")
    edit.add_argument("--init-image", default=None, help="image to edit: img2img / SDEdit unless --mask, --invert or "
                      "--colorize says otherwise (resized to the generation size)")
    edit.add_argument("--strength", type=float, default=None,
                      help="share of the steps that run, from the matching noise level: 0 keeps the image, 1 starts "
                           "from pure noise (default: 0.75 for img2img, 1 for the other edits)")
    edit.add_argument("--mask", default=None, help="inpainting mask image: white = repaint, black = keep")
    edit.add_argument("--resample", type=int, default=0, help="RePaint-style resampling rounds for --mask")
    edit.add_argument("--invert", action="store_true",
                      help="inversion editing: DDIM-invert --init-image with --source-prompt, then sample the prompt")
    edit.add_argument("--source-prompt", default="", help="prompt describing --init-image, for --invert")
    edit.add_argument("--colorize", action="store_true", help="colourise the grey version of --init-image")
    guide = parser.add_argument_group("classifier guidance (Dhariwal & Nichol 2021)")
    guide.add_argument("--classifier", default=None, help="noisy-latent classifier part (ldm fit configs/classifier)")
    guide.add_argument("--classifier-scale", type=float, default=1.0, help="classifier guidance scale s")
    guide.add_argument("--classify", action="append", default=None, metavar="NAME=VALUE",
                       help="a label to guide towards, e.g. color=red; repeat for several")
    parser.add_argument("--from-png", default=None,
                        help="make an image written by ldm generate again from its metadata (--out: where to write it; "
                             "--init-image/--mask: where its input files are now)")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("ldm generate: give at least one --prompt \"...\" (or --prompts-file)")
    return prompts


def parse_labels(items: list[str] | None) -> dict[str, str]:
    """--classify NAME=VALUE flags as a dict."""
    from ldm.errors import UsageError

    labels = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"--classify {item!r} is not NAME=VALUE (e.g. color=red)")
        labels[name.strip()] = value.strip()
    return labels


def request_from_args(args: argparse.Namespace, prompts: list[str]):
    """The GenerationRequest the flags describe."""
    from ldm.errors import UsageError
    from ldm.generation import GenerationRequest

    if args.init_image is None and (args.mask or args.invert or args.colorize or args.strength is not None):
        raise UsageError("--mask, --strength, --invert and --colorize edit an image: give --init-image")
    labels = parse_labels(args.classify)
    if bool(args.classifier) != bool(labels):
        raise UsageError("classifier guidance needs both --classifier DIR and at least one --classify NAME=VALUE")
    return GenerationRequest(
        prompts=prompts, negative_prompt=args.negative_prompt, n=args.n, steps=args.steps, guidance=args.guidance,
        guidance_rescale=args.guidance_rescale, sampler=args.sampler, eta=args.eta, seed=args.seed,
        height=args.height, width=args.width, batch_size=args.batch_size, init_image=args.init_image, mask=args.mask,
        strength=args.strength, invert=args.invert, source_prompt=args.source_prompt, colorize=args.colorize,
        resample=args.resample, classifier=args.classifier, classifier_scale=args.classifier_scale if labels else 0.0,
        classifier_labels=labels)


def run(args: argparse.Namespace) -> int:
    import torch

    from ldm import generation
    from ldm.pipeline import TextToImagePipeline

    if args.from_png:
        request, meta = generation.read_png_request(args.from_png)
        request.init_image = args.init_image or request.init_image
        request.mask = args.mask or request.mask
    else:
        request = request_from_args(args, read_prompts(args))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = TextToImagePipeline.from_pretrained(args.pipeline, device=device)
    if args.from_png:
        generation.check_fingerprint(meta, pipe, args.pipeline, f"--from-png {args.from_png}")
    request = generation.resolve(pipe, request)
    index = meta.get("index") if args.from_png else None
    whole = not args.from_png or index is None
    images = generation.run_request(pipe, request, progress=True, only_index=None if whole else index)
    out = Path(args.out)
    if not whole:
        generation.write_image(images[0], request, pipe, args.pipeline, out, index)
        print(f"made {args.from_png} again -> {out}")
        return 0
    scale = meta.get("grid", {}).get("scale", args.scale) if args.from_png else args.scale
    grid, singles = generation.write_images(images, request, pipe, args.pipeline, out, scale, singles=not args.from_png)
    print(f"wrote grid {grid} ({len(request.prompts)} prompts x {request.n})"
          + (f" and {len(images)} images in {singles}/" if singles else ""))
    return 0
