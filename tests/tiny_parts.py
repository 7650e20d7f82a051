"""Tiny random-init parts (VAE, text encoder, U-Net) exported to a folder, for fast end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig
from ldm.io import save_part
from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ldm.modules.text_encoder import CLIPTextConditioner, CLIPTextConditionerConfig
from ldm.modules.unet import UNet, UNetConfig
from ldm.pipeline import PipelineConfig, TextToImagePipeline

TINY_UNET = {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [1, 2],
             "num_heads": 2, "head_dim": None, "num_groups": 8}


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderKLConfig(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4,
                                             norm_groups=4, resolution=32, mid_attention=False,
                                             scaling_factor=1.5, shift_factor=0.1))


def tiny_text_encoder(seed: int = 0) -> CLIPTextConditioner:
    torch.manual_seed(seed)
    return CLIPTextConditioner(CLIPTextConditionerConfig(context_length=16, width=32, heads=2, layers=1, embed_dim=32))


def export_tiny_parts(root: Path, seed: int = 0) -> tuple[Path, Path]:
    vae_dir, te_dir = root / "vae", root / "text_encoder"
    save_part(tiny_vae(seed), vae_dir)
    save_part(tiny_text_encoder(seed), te_dir)
    return vae_dir, te_dir


def tiny_pipeline(seed: int = 0, **unet_options) -> TextToImagePipeline:
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, context_dim=32, **{**TINY_UNET, **unet_options}))
    with torch.no_grad():  # zero-initialised output conv would make every sample identical: randomise it
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return TextToImagePipeline(tiny_vae(seed), tiny_text_encoder(seed), unet,
                               DiscreteSchedule(ScheduleConfig(name="scaled_linear")), PipelineConfig(height=16, width=16))
