"""``ldm lora``: inspect a LoRA adapter folder, or merge adapters into a pipeline's denoiser for good."""

from __future__ import annotations

import argparse
import shutil

HELP = "LoRA adapters: `ldm lora merge` bakes adapters into a pipeline folder, `ldm lora info` describes one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lora_command", metavar="ACTION", required=True)
    merge = sub.add_parser("merge", help="write a pipeline whose denoiser has the adapters added into its weights")
    merge.add_argument("--pipeline", required=True, help="base pipeline folder (the one the adapters were trained on)")
    merge.add_argument("--lora", action="append", required=True, metavar="PATH[:SCALE]",
                       help="adapter folder and weight (default 1); repeat for several, applied in order")
    merge.add_argument("--out", required=True, help="folder for the merged pipeline (must not be --pipeline)")
    info = sub.add_parser("info", help="print an adapter's rank, alpha, targets, parameters and sampling defaults")
    info.add_argument("path", help="adapter folder (or a diffusers-format .safetensors file)")


def run(args: argparse.Namespace) -> int:
    from ldm.cli import checks
    from ldm.errors import UsageError
    from ldm.lora import apply_to_pipeline, read_lora
    from ldm.pipeline import TextToImagePipeline

    if args.lora_command == "info":
        checks.lora_adapters("path", [args.path])
        lora = read_lora(args.path)
        n = sum(v.numel() for v in lora.state.values())
        modules = sorted({k.rpartition(".lora_")[0] for k in lora.state})
        print(f"{args.path}: rank {lora.spec.rank}, alpha {lora.spec.alpha:g} (scale {lora.spec.scaling:g}), "
              f"{len(modules)} layers, {n:,} parameters, targets {lora.spec.target_modules}")
        for key in ("denoiser_class", "base_weights_sha256", "trained_from", "distilled", "sampling"):
            if lora.record.get(key) is not None:
                print(f"  {key}: {lora.record[key]}")
        return 0

    base = checks.existing_dir("--pipeline", args.pipeline, "pipeline folder")
    out = checks.output_dir("--out", args.out)
    loras = checks.lora_adapters("--lora", args.lora)
    if out.resolve() == base.resolve():
        raise UsageError("--out must be a new folder, not --pipeline (the base pipeline stays as it is)")
    pipe = TextToImagePipeline.from_pretrained(base)
    applied = apply_to_pipeline(pipe, loras)
    pipe.save_pretrained(out)
    image_encoder = base / "text_encoder" / "image_encoder"
    if image_encoder.is_dir():  # the CLIP image tower travels along for FD-CLIP / CLIP score
        shutil.copytree(image_encoder, out / "text_encoder" / "image_encoder", dirs_exist_ok=True)
    print(f"merged {len(applied)} adapter(s) into {base} -> {out} (sampling defaults: sampler {pipe.config.sampler}, "
          f"{pipe.config.steps} steps, guidance {pipe.config.guidance:g})")
    return 0
