"""Stable Diffusion formats in and out (``ldm convert``; docs/interop.md).

One key table per part, each used in both directions (``tables.KeyTable``): ``diffusers_unet`` (U-Net ↔
diffusers ``UNet2DConditionModel`` ↔ CompVis ``model.diffusion_model.*``), ``diffusers_vae`` (VAE ↔
``AutoencoderKL`` ↔ ``first_stage_model.*``), ``clip_text`` (text encoder ↔ HF ``CLIPTextModel`` + tokenizer ↔
``cond_stage_model.*``), ``scheduler`` (noise schedule and sampler ↔ a diffusers scheduler config). Whole
pipelines: ``diffusers_pipeline`` (folders) and ``single_file`` (CompVis/A1111 files); ``features`` lists what a
Stable Diffusion target cannot hold.
"""
