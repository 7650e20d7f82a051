"""``ldm generate``: prompts → a grid PNG (one row per prompt) plus the single images."""

from __future__ import annotations

import argparse

from ldm.cli import checks
from ldm.errors import UsageError

HELP = "generate images from text prompts with an exported pipeline folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ldm.diffusion.samplers import SAMPLERS

    parser.add_argument("--pipeline", default="checkpoints/shapes/pipeline",
                        help="pipeline folder (vae/ text_encoder/ unet/ scheduler/ pipeline.json), written by make train-ldm")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt; repeat the flag for several (each becomes a grid row). '' is unconditional")
    parser.add_argument("--prompts-file", default=None, help="text file with one prompt per line (added to --prompt)")
    parser.add_argument("--negative-prompt", default=None, help="prompt to steer away from (replaces '' in guidance)")
    parser.add_argument("--n", type=checks.int_at_least(1), default=4, help="images per prompt (grid columns)")
    parser.add_argument("--steps", type=checks.int_at_least(1), default=None,
                        help="sampling steps (default: pipeline.json's, 20)")
    parser.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="sampler (default: pipeline.json's, dpmpp-2m)")
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
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="load a pipeline whose parts were not trained together (a warning instead of an error)")


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


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    out = checks.output_file("--out", args.out, checks.IMAGE_SUFFIXES)
    checks.existing_dir("--pipeline", args.pipeline, "pipeline folder")
    device = checks.torch_device("--device", args.device)

    from ldm.pipeline import TextToImagePipeline
    from ldm.visual import image_grid, to_pil

    pipe = TextToImagePipeline.from_pretrained(args.pipeline, device=device, allow_mismatch=args.allow_mismatch)
    check_size(pipe, args.height, args.width)
    extra = {} if args.eta is None else {"eta": args.eta}
    images = to_pil(pipe.generate(prompts, negative_prompt=args.negative_prompt, steps=args.steps,
                                  guidance=args.guidance, sampler=args.sampler, seed=args.seed, height=args.height,
                                  width=args.width, n_per_prompt=args.n, batch_size=args.batch_size,
                                  guidance_rescale=args.guidance_rescale, **extra))
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows=len(prompts), scale=args.scale).save(out)
    singles = out.with_suffix("")
    singles.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(singles / f"{i // args.n:03d}_{i % args.n:02d}.png")
    (singles / "prompts.txt").write_text("\n".join(prompts) + "\n")
    print(f"wrote grid {out} ({len(prompts)} prompts x {args.n}) and {len(images)} images in {singles}/")
    return 0
