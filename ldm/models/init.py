"""Start a training run from an exported pipeline folder (``init_from: PIPELINE``): its frozen VAE and text
encoder, its denoiser (config and weights) and its noise schedule, so that fine-tuning (full or LoRA) and
distillation begin exactly where the pipeline ended."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ldm.diffusion.schedules import DiscreteSchedule
from ldm.io import PartError, weights_hash
from ldm.modules.denoiser import derive_denoiser
from ldm.pipeline import PipelineConfig, TextToImagePipeline


@dataclass
class PipelineStart:
    """What a run takes from a pipeline; ``base_hash`` is the sha256 of the denoiser weights it starts from."""

    path: Path
    vae: nn.Module
    text_encoder: nn.Module
    denoiser: nn.Module
    schedule: DiscreteSchedule
    config: PipelineConfig
    base_hash: str | None


def load_pipeline_start(path: str | Path, denoiser_overrides: dict[str, Any] | None = None,
                        source: str = "model.init_args.init_from") -> PipelineStart:
    """Load ``path`` (a pipeline folder); ``denoiser_overrides`` change config fields of its denoiser
    (``ldm.modules.denoiser.derive_denoiser``). The VAE and text encoder come back frozen in eval mode."""
    try:
        pipe = TextToImagePipeline.from_pretrained(path)
    except PartError as e:
        raise PartError(f"{source}: {path} is not a usable pipeline folder ({e})") from e
    base_hash = weights_hash(pipe.denoiser)
    denoiser = pipe.denoiser
    if denoiser_overrides:
        try:
            denoiser = derive_denoiser(denoiser, denoiser_overrides, f"{source} + denoiser")
        except ValueError as e:
            raise PartError(str(e)) from e
    denoiser.requires_grad_(True).train()
    for part in (pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    return PipelineStart(Path(path), pipe.vae, pipe.text_encoder, denoiser, pipe.schedule, pipe.config, base_hash)
