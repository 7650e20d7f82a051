"""What a Stable Diffusion target (a diffusers ``StableDiffusionPipeline`` folder, a CompVis/A1111 single file)
cannot hold: one list over every part, refused in ONE message that names each feature.

Each part's module contributes its own ``export_problems`` (U-Net, VAE, text encoder, schedule); the pipeline
adds what only the whole pipeline decides: a non-U-Net denoiser, pooled-text conditioning (the U-Net could
take it as a class embedding, but ``StableDiffusionPipeline`` passes none), a learned-variance output, and a
latent shift (SD pipelines decode ``latents / scaling_factor``, with no shift). The shapes configs have an SD-
compatible variant (``ldm/configs/{vae,clip,ldm}/shapes-sd.yaml``) that trains an exportable pipeline.
"""

from __future__ import annotations

from ldm.interop import clip_text, diffusers_unet, diffusers_vae, scheduler
from ldm.interop.tables import ConversionError
from ldm.modules.unet import UNet

HINT = "train an SD-compatible pipeline instead (make train-ldm DATA=shapes VARIANT=-sd; docs/interop.md)"


def export_problems(pipe) -> list[str]:
    """Every feature of ``pipe`` (a ``TextToImagePipeline``) that a Stable Diffusion target cannot express."""
    problems = []
    denoiser = pipe.denoiser
    if not isinstance(denoiser, UNet):
        problems.append(f"a non-UNet denoiser ({type(denoiser).__name__}; SD holds a UNet2DConditionModel)")
    else:
        config = denoiser.config
        problems += diffusers_unet.export_problems(config)
        if config.pooled_dim:
            problems.append(f"pooled-text conditioning (U-Net pooled_dim={config.pooled_dim}; "
                            "StableDiffusionPipeline gives the U-Net no pooled embedding)")
        if config.extra_conditions:
            problems.append(f"size/crop micro-conditioning (U-Net extra_conditions={config.extra_conditions}; "
                            "StableDiffusionPipeline passes no such inputs)")
        if config.out_channels != config.in_channels:
            problems.append(f"a learned-variance output ({config.out_channels} channels for "
                            f"{config.in_channels}-channel latents)")
    vae = pipe.vae.config
    problems += diffusers_vae.export_problems(vae)
    if vae.shift_factor:
        problems.append(f"a latent shift (vae shift_factor={vae.shift_factor:.4g}; SD pipelines decode "
                        "latents / scaling_factor: train the VAE with latent_shift: false)")
    problems += clip_text.export_problems(pipe.text_encoder.config)
    problems += scheduler.export_problems(pipe.schedule)
    return problems


def check_exportable(pipe, source: str, target: str) -> None:
    """Raise one :class:`ConversionError` naming every feature ``target`` cannot express (none: return)."""
    problems = export_problems(pipe)
    if problems:
        raise ConversionError(f"{source} cannot be written as {target}: it uses {'; '.join(problems)}. {HINT}")
