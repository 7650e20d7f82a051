"""``ldm generate``: prompts → a grid image (one row per prompt, labelled) plus the single images, each PNG carrying
its generation parameters (``ldm.generation``); ``--from-png`` makes one again. Edits of an ``--init-image``
(img2img, ``--invert``, ``--mask``, ``--colorize``) and classifier guidance are options of the same request."""

from __future__ import annotations

import argparse

from ldm.cli import checks
from ldm.errors import UsageError

HELP = "generate images from text prompts with an exported pipeline folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ldm.diffusion.samplers import SAMPLERS

    parser.add_argument("--pipeline", default="checkpoints/shapes/pipeline",
                        help="pipeline folder (vae/ text_encoder/ unet/ scheduler/ pipeline.json), "
                             "written by make train-ldm")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt; repeat the flag for several (each becomes a grid row). '' is unconditional")
    parser.add_argument("--prompts-file", default=None, help="text file with one prompt per line (added to --prompt)")
    parser.add_argument("--negative-prompt", default=None, help="prompt to steer away from (replaces '' in guidance)")
    parser.add_argument("--n", type=checks.int_at_least(1), default=4, help="images per prompt (grid columns)")
    parser.add_argument("--steps", type=checks.int_at_least(1), default=None,
                        help="sampling steps (default: pipeline.json's, 20)")
    parser.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                        help="sampler (default: pipeline.json's, dpmpp-2m)")
    parser.add_argument("--guidance", type=checks.float_in(0), default=None,
                        help="classifier-free guidance scale w (1 = off, 0 = unconditional; default: pipeline.json's)")
    parser.add_argument("--guidance-rescale", type=checks.float_in(0, 1), default=None,
                        help="guidance rescale φ in [0, 1] (Lin et al. 2024)")
    parser.add_argument("--eta", type=checks.float_in(0), default=None,
                        help="stochasticity for ddim (0 = deterministic) and euler-a")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed + prompts = same images")
    parser.add_argument("--height", type=checks.int_at_least(1), default=None,
                        help="image height (multiple of the VAE factor; default: training size)")
    parser.add_argument("--width", type=checks.int_at_least(1), default=None,
                        help="image width (multiple of the VAE factor; default: training size)")
    parser.add_argument("--batch-size", type=checks.int_at_least(1), default=64, help="images sampled together")
    parser.add_argument("--scale", type=checks.int_at_least(1), default=4,
                        help="nearest-neighbour upscaling of the grid for viewing")
    parser.add_argument("--out", default="samples.png",
                        help="grid image path (.png, .jpg, .jpeg or .webp); single images go to <out stem>/")
    parser.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                        help="apply a LoRA adapter folder with weight SCALE (default 1), merged into the denoiser; "
                             "repeat for several. An LCM-LoRA also sets the sampling defaults "
                             "(lcm, 4 steps, guidance 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="load a pipeline whose parts were not trained together (a warning instead of an error)")
    edit = parser.add_argument_group("editing an image (ldm.editing)")
    edit.add_argument("--init-image", default=None, help="image to edit: img2img / SDEdit unless --mask, --invert or "
                      "--colorize says otherwise (resized to the generation size)")
    edit.add_argument("--strength", type=checks.float_in(0, 1), default=None,
                      help="share of the steps that run, from the matching noise level: 0 keeps the image, 1 starts "
                           "from pure noise (default: 0.75 for img2img, 1 for the other edits)")
    edit.add_argument("--mask", default=None, help="inpainting mask image: white = repaint, black = keep")
    edit.add_argument("--resample", type=checks.int_at_least(0), default=0,
                      help="RePaint-style resampling rounds for --mask")
    edit.add_argument("--invert", action="store_true",
                      help="inversion editing: DDIM-invert --init-image with --source-prompt, then sample the prompt")
    edit.add_argument("--source-prompt", default="", help="prompt describing --init-image, for --invert")
    edit.add_argument("--colorize", action="store_true", help="colourise the grey version of --init-image")
    guide = parser.add_argument_group("classifier guidance (Dhariwal & Nichol 2021)")
    guide.add_argument("--classifier", default=None, help="noisy-latent classifier part (ldm fit configs/classifier)")
    guide.add_argument("--classifier-scale", type=checks.float_in(0), default=1.0, help="classifier guidance scale s")
    guide.add_argument("--classify", action="append", default=None, metavar="NAME=VALUE",
                       help="a label to guide towards, e.g. color=red; repeat for several")
    parser.add_argument("--from-png", default=None,
                        help="make an image written by ldm generate again from its metadata (--out: where to write it; "
                             "--init-image/--mask: where its input files are now)")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The --prompt flags followed by the non-empty lines of --prompts-file; at least one."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = checks.existing_file("--prompts-file", args.prompts_file)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompts-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        prompts += [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give at least one --prompt \"...\" (or a --prompts-file with one prompt per line)")
    return prompts


def check_size(pipe, height: int | None, width: int | None) -> None:
    """--height/--width are multiples of the pipeline's VAE factor (checked right after loading, before sampling)."""
    f = pipe.vae.config.downsample_factor
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value % f:
            raise UsageError(f"{flag} {value} is not a multiple of the VAE factor {f} of this pipeline "
                             f"(e.g. {max(f, value // f * f)})")


def parse_labels(items: list[str] | None) -> dict[str, str]:
    """--classify NAME=VALUE flags as a dict."""
    labels = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"--classify {item!r} is not NAME=VALUE (e.g. color=red)")
        labels[name.strip()] = value.strip()
    return labels


def request_from_args(args: argparse.Namespace):
    """The GenerationRequest the flags describe (files checked, nothing loaded)."""
    from ldm.generation import GenerationRequest

    if args.init_image is None and (args.mask or args.invert or args.colorize or args.strength is not None):
        raise UsageError("--mask, --strength, --invert and --colorize edit an image: give --init-image")
    if args.invert and args.sampler not in (None, "ddim"):
        raise UsageError(f"--invert samples with ddim (the inverse of its encoding), not --sampler {args.sampler}")
    labels = parse_labels(args.classify)
    if bool(args.classifier) != bool(labels):
        raise UsageError("classifier guidance needs both --classifier DIR and at least one --classify NAME=VALUE")
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path is not None:
            checks.existing_file(flag, path)
    if args.classifier:
        checks.existing_dir("--classifier", args.classifier, "part folder")
    return GenerationRequest(
        prompts=read_prompts(args), negative_prompt=args.negative_prompt, n=args.n, steps=args.steps,
        guidance=args.guidance, guidance_rescale=args.guidance_rescale, sampler=args.sampler, eta=args.eta,
        seed=args.seed, height=args.height, width=args.width, batch_size=args.batch_size, init_image=args.init_image,
        mask=args.mask, strength=args.strength, invert=args.invert, source_prompt=args.source_prompt,
        colorize=args.colorize, resample=args.resample, classifier=args.classifier,
        classifier_scale=args.classifier_scale if labels else 0.0, classifier_labels=labels)


def run(args: argparse.Namespace) -> int:
    from ldm import generation

    if args.from_png:
        request, meta = generation.read_png_request(checks.existing_file("--from-png", args.from_png))
        request.init_image = args.init_image or request.init_image
        request.mask = args.mask or request.mask
    else:
        request = request_from_args(args)
    out = checks.output_file("--out", args.out, checks.IMAGE_SUFFIXES)
    checks.existing_dir("--pipeline", args.pipeline, "pipeline folder")
    loras = checks.lora_adapters("--lora", args.lora)
    device = checks.torch_device("--device", args.device)

    from ldm.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.pipeline, device=device, allow_mismatch=args.allow_mismatch)
    if loras:  # merged into the denoiser: the pipeline's fingerprint is then that of the merged weights
        from ldm.lora import apply_to_pipeline

        apply_to_pipeline(pipe, loras)
    if request.sampler == "lcm" and not pipe.config.consistency_model:
        raise UsageError(f"--sampler lcm needs a consistency-distilled model (`make train-lcm`, or an LCM-LoRA through "
                         f"--lora); {args.pipeline} is a diffusion model: use dpmpp-2m, ddim, euler, ...")
    if args.from_png:
        generation.check_fingerprint(meta, pipe, args.pipeline, f"--from-png {args.from_png}")
    else:
        check_size(pipe, args.height, args.width)
    request = generation.resolve(pipe, request)
    index = meta.get("index") if args.from_png else None
    whole = not args.from_png or index is None
    images = generation.run_request(pipe, request, progress=True, only_index=None if whole else index)
    if not whole:
        generation.write_image(images[0], request, pipe, args.pipeline, out, index)
        print(f"made {args.from_png} again -> {out}")
        return 0
    scale = meta.get("grid", {}).get("scale", args.scale) if args.from_png else args.scale
    grid, singles = generation.write_images(images, request, pipe, args.pipeline, out, scale, singles=not args.from_png)
    print(f"wrote grid {grid} ({len(request.prompts)} prompts x {request.n})"
          + (f" and {len(images)} images in {singles}/" if singles else ""))
    return 0
