"""`ldm convert` measured: image parity with diffusers and the cost of converting an SD-1.5-sized pipeline.

    python -m ldm.bench.interop --parity                       # tiny random SD pipelines: max |ours - diffusers|
    python -m ldm.bench.interop --sd15 /tmp/sd15 --dtype float16   # time, CPU time, peak RSS of each conversion

Parity: tiny random diffusers Stable Diffusion pipelines (SD 1.x style, SD 2.x style with v-prediction), built
offline, are converted and both sides make images from the same initial latents, prompts, scheduler and steps;
the figure is the largest absolute pixel difference in [0, 1]. The SD-1.5 run builds a diffusers folder of random
weights with the released geometry (U-Net 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text 123.1 M parameters) and runs each
`ldm convert` in its own process under GNU time (wall, user + system CPU, peak RSS). Needs diffusers (a test
dependency). Results: a table on stdout and JSON in ``checkpoints/bench/interop.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PROMPTS = ["a red circle", "blue circle on the left", ""]
SIZE = 16           # pixels: 8x8 latents through the f=2 VAE below


def write_tokenizer(folder: Path, pad_token: str) -> dict[str, int]:
    """A tiny CLIP byte-level BPE (every byte + a few merges), written as vocab.json + merges.txt."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "b l", "bl u", "blu e</w>",
              "o n</w>", "t h", "th e</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], pad_token=pad_token,
                  model_max_length=77).save_pretrained(folder)
    return vocab


def tiny_diffusers_pipeline(root: Path, sd2: bool = False, scheduler: str = "ddim", seed: int = 0):
    """A random SD-1.x-style (8 heads → 2 here, conv projections, QuickGELU CLIP, ε) or SD-2.x-style (head width,
    linear projections, GELU CLIP padded with "!", v-prediction) diffusers pipeline, saved to ``root``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = write_tokenizer(root / "_tokenizer", "!" if sd2 else "<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(root / "_tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=SIZE, scaling_factor=0.5)
    eos = vocab["<|endoftext|>"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=eos, pad_token_id=vocab["!"] if sd2 else eos))
    common = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "timestep_spacing": "trailing",
              "prediction_type": "v_prediction" if sd2 else "epsilon", "steps_offset": 0}
    if scheduler == "ddim":
        sched = DDIMScheduler(**common, set_alpha_to_one=True, clip_sample=False)
    else:
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                            final_sigmas_type="zero")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "diffusers")
    return pipe


def diffusers_images(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0,
                     size: int = SIZE) -> torch.Tensor:
    """diffusers' images in [0, 1] from the initial latents ldm's pipeline draws for ``seed``."""
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latents = torch.randn((len(prompts), pipe.unet.config.in_channels, size // f, size // f),
                          generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pipe(prompts, latents=latents, num_inference_steps=steps, guidance_scale=guidance, height=size,
                    width=size, output_type="pt").images


def ours_images(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0) -> torch.Tensor:
    """ldm's images, mapped from [-1, 1] to diffusers' [0, 1]."""
    return (pipe.generate(prompts, steps=steps, guidance=guidance, seed=seed, progress=False) / 2 + 0.5).clamp(0, 1)


# ---- parity --------------------------------------------------------------------------------------------------
def parity(root: Path, steps: int = 4, guidance: float = 3.0) -> dict[str, float]:
    """Max |ours − diffusers| over the images of :data:`PROMPTS`, for every way in and out."""
    import yaml
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from ldm.interop.diffusers_pipeline import export_diffusers, import_diffusers
    from ldm.interop.single_file import export_single_file, import_single_file
    from ldm.pipeline import TextToImagePipeline

    def diff(ours: Any, theirs: Any) -> float:
        return (ours_images(ours, PROMPTS, steps, guidance) - diffusers_images(theirs, PROMPTS, steps, guidance)
                ).abs().max().item()

    out: dict[str, float] = {}
    for name, sd2, sampler in (("sd1-ddim", False, "ddim"), ("sd1-dpmpp-2m", False, "dpm"),
                               ("sd2-v-ddim", True, "ddim"), ("sd2-v-dpmpp-2m", True, "dpm")):
        case = root / name
        reference = tiny_diffusers_pipeline(case, sd2=sd2, scheduler=sampler)
        imported, _ = import_diffusers(case / "diffusers", case / "ours")
        ours = TextToImagePipeline.from_pretrained(imported)
        out[f"import diffusers {name}"] = diff(ours, reference)
        written = export_single_file(imported, case / "sd.safetensors")
        save_file(load_file(str(written)), str(case / "bare.safetensors"))  # a file without ldm's metadata
        config = {"image_size": SIZE, "vae": {"norm_groups": 4, "scaling_factor": 0.5},
                  "unet": {"head_dim": 8, "num_groups": 8} if sd2 else {"num_heads": 2, "num_groups": 8},
                  "text_encoder": {"heads": 2, "tokenizer": str(case / "diffusers" / "tokenizer"),
                                   **({"hidden_act": "gelu"} if sd2 else {})},
                  "pipeline": {"sampler": ours.config.sampler}, **({"prediction_type": "v"} if sd2 else {})}
        (case / "config.yaml").write_text(yaml.safe_dump(config))
        import_single_file(case / "bare.safetensors", case / "from-file", case / "config.yaml")
        out[f"import single file {name}"] = diff(TextToImagePipeline.from_pretrained(case / "from-file"), reference)
        exported = export_diffusers(imported, case / "exported")
        out[f"export diffusers {name}"] = diff(ours, StableDiffusionPipeline.from_pretrained(exported,
                                                                                             local_files_only=True))
        if not sd2:
            loaded = StableDiffusionPipeline.from_single_file(str(written), config=str(exported), local_files_only=True)
            out[f"export single file (diffusers' loader) {name}"] = diff(ours, loaded)
    return out


# ---- SD-1.5-sized conversions ----------------------------------------------------------------------------------
def build_sd15(folder: Path, dtype: torch.dtype) -> dict[str, int]:
    """A diffusers StableDiffusionPipeline folder of random weights with SD 1.5's geometry, built in ``dtype``
    (each model initialised directly in it); returns the parameter counts."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm.interop.clip_text import open_clip_tokenizer_spec
    from ldm.interop.diffusers_unet import diffusers_config
    from ldm.interop.diffusers_vae import to_diffusers_config
    from ldm.io import write_json
    from ldm.modules.autoencoder import AutoencoderKLConfig
    from ldm.modules.unet import UNetConfig

    counts = {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        for name, build in (
                ("unet", lambda: UNet2DConditionModel(**diffusers_config(UNetConfig.sd15(), sample_size=64))),
                ("vae", lambda: AutoencoderKL(**to_diffusers_config(AutoencoderKLConfig(resolution=512,
                                                                                         scaling_factor=0.18215)))),
                ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(
                    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                    projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)))):
            model = build()
            counts[name] = sum(p.numel() for p in model.parameters())
            model.save_pretrained(folder / name)
            del model
    finally:
        torch.set_default_dtype(previous)
    spec = open_clip_tokenizer_spec(77)
    CLIPTokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]], bos_token=spec["bos_token"],
                  eos_token=spec["eos_token"], unk_token=spec["unk_token"], pad_token="<|endoftext|>",
                  model_max_length=77).save_pretrained(folder / "tokenizer")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1, set_alpha_to_one=False).save_pretrained(folder / "scheduler")
    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False})
    return counts


def timed(args: list[str]) -> dict[str, float]:
    """Run ``ldm ARGS`` in a fresh process under GNU time: wall and CPU seconds, peak RSS in GiB."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        command = ["/usr/bin/time", "-o", report.name, "-f", "%e %U %S %M", sys.executable, "-c",
                   "import sys; from ldm.cli import main; sys.exit(main())", *args]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall, user, system, kib = report.read().split()[-4:]
    return {"wall_s": float(wall), "cpu_s": float(user) + float(system), "peak_rss_gib": int(kib) / 2**20}


def sd15_timings(root: Path, dtype: torch.dtype) -> dict[str, Any]:
    start = time.perf_counter()
    counts = build_sd15(root / "diffusers", dtype)
    built = time.perf_counter() - start
    steps = [("import diffusers", ["convert", "--from", "diffusers", str(root / "diffusers"), "--out",
                                   str(root / "ours")]),
             ("export diffusers", ["convert", "--to", "diffusers", str(root / "ours"), "--out",
                                   str(root / "exported")]),
             ("export single file", ["convert", "--to", "single-file", str(root / "ours"), "--out",
                                     str(root / "sd15.safetensors")]),
             ("import single file", ["convert", "--from", "single-file", str(root / "sd15.safetensors"), "--out",
                                     str(root / "from-file")])]
    results = {name: timed(args) for name, args in steps}
    same = all((root / "ours" / p / "model.safetensors").read_bytes() == (root / "from-file" / p / "model.safetensors")
               .read_bytes() for p in ("unet", "vae", "text_encoder"))
    size = sum(f.stat().st_size for f in (root / "ours").rglob("*.safetensors")) / 2**30
    return {"dtype": str(dtype).removeprefix("torch."), "parameters": counts, "build_s": built,
            "pipeline_gib": size, "single_file_round_trip_bit_identical": same, "steps": results}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``ldm bench interop`` / ``python -m ldm.bench.interop``."""
    parser.add_argument("--parity", action="store_true",
                        help="image parity (max |ours - diffusers| in [0, 1]) on tiny random SD 1.x / 2.x pipelines, "
                             "every way in and out")
    parser.add_argument("--sd15", default=None, metavar="FOLDER",
                        help="time each `ldm convert` of an SD-1.5-sized random pipeline built in FOLDER (several GB; "
                             "removed after)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                        help="weights dtype of the SD-1.5-sized pipeline")
    parser.add_argument("--out", default="checkpoints/bench/interop.json", help="JSON results file")


COLUMNS = [("row", "conversion", ""), ("max_abs", "max |diff|", ".2e"), ("wall_s", "wall s", ".1f"),
           ("cpu_s", "CPU s", ".1f"), ("peak_rss_gib", "peak RSS GiB", ".2f")]


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The measurements ``args`` ask for (neither flag: ``--parity``); the result has ``rows`` for the table."""
    from ldm.table import format_table

    report: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "loadavg_before": os.getloadavg()}
    rows: list[dict[str, Any]] = []
    if args.parity or not args.sd15:
        with tempfile.TemporaryDirectory() as tmp:
            report["parity_max_abs"] = parity(Path(tmp))
        rows += [{"row": name, "max_abs": value} for name, value in report["parity_max_abs"].items()]
    if args.sd15:
        root = Path(args.sd15)
        root.mkdir(parents=True, exist_ok=True)
        try:
            report["sd15"] = sd15_timings(root, getattr(torch, args.dtype))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rows += [{"row": f"SD 1.5 {args.dtype} {name}", **r} for name, r in report["sd15"]["steps"].items()]
    report["loadavg_after"] = os.getloadavg()
    report["rows"] = rows
    report["table"] = format_table(rows, COLUMNS)
    return report


def main(argv: list[str] | None = None) -> int:
    from ldm.io import write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    report = benchmark(args)
    print(report["table"])
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
