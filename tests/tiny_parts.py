"""Tiny random-init parts (VAE, text encoder, U-Net, CLIP image tower) exported to a folder, for fast end-to-end
tests; and torch-fidelity's Inception-v3 with random weights, for the FID path without its download."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig
from ldm.io import save_part
from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ldm.modules.text_encoder import (
    CLIPImageEncoder,
    CLIPImageEncoderConfig,
    CLIPTextConditioner,
    CLIPTextConditionerConfig,
)
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
                               DiscreteSchedule(ScheduleConfig(name="scaled_linear")),
                               PipelineConfig(height=16, width=16))


def tiny_image_encoder(seed: int = 0, embed_dim: int = 32) -> CLIPImageEncoder:
    """A conv CLIP image tower whose embedding matches tiny_text_encoder's pooled size (32)."""
    torch.manual_seed(seed)
    config = CLIPImageEncoderConfig(tower="conv", image_size=16, width=16, layers=2, embed_dim=embed_dim)
    return CLIPImageEncoder(config)


def tiny_pipeline_dir(root: Path, with_image_encoder: bool = True) -> Path:
    """tiny_pipeline() saved as a folder, with the CLIP image tower at text_encoder/image_encoder."""
    tiny_pipeline().save_pretrained(root)
    if with_image_encoder:
        save_part(tiny_image_encoder(), root / "text_encoder" / "image_encoder")
    return root


def random_inception(seed: int = 0) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (2048 pool features, eval mode) with random weights.

    Its constructor always loads a state dict (downloading one when given no path), so this subclass hands it an
    empty one and ignores it. Convolutions are re-drawn He-normal (He et al. 2015, eq. 10) so the 2048 features
    keep O(1) scale through the ~50 layers, and every BatchNorm gets random affine parameters and running
    statistics, so each tensor of the state dict changes the features.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(seed)
    net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        nn.init.normal_(net.fc.weight, std=0.02)
    return net.eval()
