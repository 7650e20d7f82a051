"""``ldm generate``: prompts → a grid PNG (one row per prompt) plus the single images."""

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
    parser.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                        help="apply a LoRA adapter folder with weight SCALE (default 1), merged into the denoiser; "
                             "repeat for several. An LCM-LoRA also sets the sampling defaults (lcm, 4 steps, guidance 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("ldm generate: give at least one --prompt \"...\" (or --prompts-file)")
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    from ldm.pipeline import TextToImagePipeline
    from ldm.visual import image_grid, to_pil

    prompts = read_prompts(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = TextToImagePipeline.from_pretrained(args.pipeline, device=device)
    if args.lora:
        from ldm.lora import apply_to_pipeline, parse_lora_argument

        apply_to_pipeline(pipe, [parse_lora_argument(text) for text in args.lora])
    extra = {} if args.eta is None else {"eta": args.eta}
    images = to_pil(pipe.generate(prompts, negative_prompt=args.negative_prompt, steps=args.steps,
                                  guidance=args.guidance, sampler=args.sampler, seed=args.seed, height=args.height,
                                  width=args.width, n_per_prompt=args.n, batch_size=args.batch_size,
                                  guidance_rescale=args.guidance_rescale, **extra))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows=len(prompts), scale=args.scale).save(out)
    singles = out.with_suffix("")
    singles.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(singles / f"{i // args.n:03d}_{i % args.n:02d}.png")
    (singles / "prompts.txt").write_text("\n".join(prompts) + "\n")
    print(f"wrote grid {out} ({len(prompts)} prompts x {args.n}) and {len(images)} images in {singles}/")
    return 0
