"""Tiny random Stable Diffusion pipelines in diffusers' format (SD 1.x and SD 2.x style), built offline, and
the comparison of our images with diffusers' for the same latents, prompts, scheduler and steps."""

from __future__ import annotations

import json
from pathlib import Path

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
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
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
    common = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "trailing",
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
