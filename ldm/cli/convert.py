"""``ldm convert``: Stable Diffusion weights in and out (diffusers folders, CompVis/A1111 single files, HF CLIP).

    ldm convert --from diffusers DIR --out PIPELINE          a StableDiffusionPipeline folder (SD 1.x/2.x)
    ldm convert --from single-file FILE --out PIPELINE [--config CONFIG.yaml]   .safetensors or .ckpt
    ldm convert --from hf-clip DIR --out PART                a CLIPTextModel + CLIPTokenizer → text encoder part
    ldm convert --to diffusers PIPELINE --out DIR            loads in diffusers' StableDiffusionPipeline
    ldm convert --to single-file PIPELINE --out FILE.safetensors

Every conversion is exact (see ``ldm.interop``); parts a target cannot hold are refused in one message.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ldm.errors import UsageError

HELP = "convert Stable Diffusion weights: diffusers folders and single files in, diffusers and single files out"
SOURCES = ("diffusers", "single-file", "hf-clip")
TARGETS = ("diffusers", "single-file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "PATH"),
                     help=f"import PATH of FORMAT ({' | '.join(SOURCES)}) into an ldm pipeline (hf-clip: a "
                          "text-encoder part)")
    way.add_argument("--to", dest="target", nargs=2, metavar=("FORMAT", "PIPELINE"),
                     help=f"export the ldm PIPELINE folder as FORMAT ({' | '.join(TARGETS)})")
    parser.add_argument("--out", required=True, help="the folder (or .safetensors file) to write; replaced whole")
    parser.add_argument("--config", default=None,
                        help="single-file import: YAML/JSON of what the file cannot tell (prediction_type, image_size, "
                             "unet/vae/text_encoder/schedule/pipeline fields; see ldm.interop.single_file)")
    parser.add_argument("--layer", choices=("last", "penultimate"), default="last",
                        help="hf-clip import: which layer's token states condition the denoiser")
    parser.add_argument("--mask-padding", action=argparse.BooleanOptionalAction, default=True,
                        help="hf-clip import: mask the padding tokens (ldm) or hand the denoiser every position "
                             "(--no-mask-padding: the SD convention, needed to export to diffusers)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.source:
        kind, path = args.source
        if kind not in SOURCES:
            raise UsageError(f"--from {kind}: unknown format; use one of {', '.join(SOURCES)}")
        if args.config and kind != "single-file":
            raise UsageError("--config is for --from single-file (a diffusers folder states its configs)")
        out, notes = _import(kind, Path(path), Path(args.out), args)
    else:
        kind, path = args.target
        if kind not in TARGETS:
            raise UsageError(f"--to {kind}: unknown format; use one of {', '.join(TARGETS)}")
        out, notes = _export(kind, Path(path), Path(args.out)), []
    for note in notes:
        print(f"note: {note}")
    print(f"converted {path} ({kind}) -> {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _import(kind: str, path: Path, out: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    if kind == "diffusers":
        from ldm.interop.diffusers_pipeline import import_diffusers

        return import_diffusers(path, out)
    if kind == "single-file":
        from ldm.interop.single_file import import_single_file

        return import_single_file(path, out, args.config), []
    from ldm.interop.clip_text import read_hf_folder
    from ldm.io import atomic_folder, save_part

    sd_layout = (path / "text_encoder").is_dir()  # an SD folder, or one CLIP folder holding both
    text_dir, tok_dir = (path / "text_encoder", path / "tokenizer") if sd_layout else (path, path)
    encoder = read_hf_folder(text_dir, tok_dir, args.layer, args.mask_padding, meta_init=True)
    return atomic_folder(out, lambda folder: save_part(encoder, folder)), []


def _export(kind: str, pipeline: Path, out: Path) -> Path:
    if kind == "diffusers":
        from ldm.interop.diffusers_pipeline import export_diffusers

        return export_diffusers(pipeline, out)
    from ldm.interop.single_file import export_single_file

    return export_single_file(pipeline, out)
