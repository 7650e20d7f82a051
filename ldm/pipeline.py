"""Text → image: encode the prompt, run a sampler on VAE latents with classifier-free guidance, decode.

``TextToImagePipeline.from_pretrained(dir)`` loads a pipeline folder (diffusers-like layout)::

    vae/ text_encoder/ unet/     exported parts (config.json + model.safetensors, see ldm.io); unet/ holds
                                 the denoiser whatever its class (the name is diffusers')
    scheduler/config.json        the training noise schedule (and the model's prediction type)
    pipeline.json                image size and sampling defaults

No Lightning and no webdataset are imported here. The generation is LDM eq. 3 at inference:
z_T ~ N(0, I) → sampler(ε_θ(z_t, t, τ_θ(y)) with CFG) → x = D(z_0 / scale + shift).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ldm import __version__
from ldm.conditioning import Conditioning
from ldm.diffusion.guidance import guided_model
from ldm.diffusion.samplers import SAMPLERS, ModelFn, sample
from ldm.diffusion.schedules import NoiseSchedule, build_schedule
from ldm.io import (CONFIG_NAME, PartError, config_from_dict, load_part, part_metadata, read_json, save_part,
                    weights_hash, write_json)
from ldm.modules.denoiser import check_compatible, conditioning_for
from ldm.visual import to_pil

PIPELINE_FILE = "pipeline.json"
PARTS = ("vae", "text_encoder", "unet", "scheduler")
DENOISER_DIR = "unet"   # the diffusers folder name, whatever the denoiser's class


@dataclass
class PipelineConfig:
    """Image size the denoiser was trained at and the sampling defaults (``pipeline.json``)."""

    height: int = 32
    width: int = 32
    steps: int = 20
    guidance: float = 4.0
    sampler: str = "dpmpp-2m"
    guidance_rescale: float = 0.0


def save_schedule(schedule: NoiseSchedule, out_dir: str | Path) -> Path:
    """Write ``out_dir/config.json`` (a schedule has no weights)."""
    out = Path(out_dir)
    write_json(out / CONFIG_NAME, {"_class_name": type(schedule).__name__, "_ldm_version": __version__,
                                   **schedule.to_config()})
    return out


def load_schedule(path: str | Path) -> NoiseSchedule:
    """Read a folder written by :func:`save_schedule` (a pipeline's ``scheduler/``): VP or VE by its name."""
    config = read_json(Path(path) / CONFIG_NAME)
    try:
        return build_schedule(config)
    except (TypeError, ValueError) as e:
        raise PartError(f"{Path(path) / CONFIG_NAME}: {e}") from e


def check_trained_together(path: Path, recorded: dict[str, str] | None, current: dict[str, str | None],
                           allow_mismatch: bool = False) -> None:
    """Refuse (or with ``allow_mismatch`` warn about) parts whose weights differ from those the denoiser was
    trained with; a pipeline written before provenance was recorded loads with a warning."""
    if not recorded:
        warnings.warn(f"{path / DENOISER_DIR} records no provenance (written by an older ldm): the parts cannot be "
                      "checked; re-export the pipeline (ldm export) to record it", UserWarning, stacklevel=3)
        return
    differ = [name for name, digest in current.items() if recorded.get(name) and digest and recorded[name] != digest]
    if not differ:
        return
    message = (f"pipeline {path}: the denoiser was trained with another {' and '.join(differ)} than the one(s) "
               "in this folder; its images would be wrong")
    if not allow_mismatch:
        raise PartError(message + " (--allow-mismatch to load anyway)")
    warnings.warn(message, UserWarning, stacklevel=3)


class TextToImagePipeline:
    """The three frozen parts + schedule, callable as ``pipe(prompts) -> list[PIL.Image]``.

    ``denoiser`` is any denoiser (``ldm.modules.denoiser``): the pipeline never names its class.
    """

    def __init__(self, vae: torch.nn.Module, text_encoder: torch.nn.Module, denoiser: torch.nn.Module,
                 schedule: NoiseSchedule, config: PipelineConfig | None = None):
        self.vae, self.text_encoder, self.denoiser, self.schedule = vae, text_encoder, denoiser, schedule
        self.config = config or PipelineConfig()
        self._check_compatible()
        for part in (vae, text_encoder, denoiser):
            part.eval().requires_grad_(False)

    # ---- construction ----------------------------------------------------------------------------
    def _check_compatible(self) -> None:
        problems = check_compatible(self.denoiser.config, self.vae.config.z_channels, self.text_encoder.token_dim,
                                    self.text_encoder.pooled_dim)
        if problems:
            raise PartError(f"the denoiser does not fit these parts ({'; '.join(problems)}): "
                            "they were not trained together")
        f = self.vae.config.downsample_factor
        if self.config.height % f or self.config.width % f:
            raise PartError(f"pipeline size {self.config.height}x{self.config.width} is not divisible by the vae factor {f}")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, allow_mismatch: bool = False) -> TextToImagePipeline:
        """Load a pipeline folder; a missing or mismatched part is an error naming it.

        The denoiser records the weight hashes of the VAE and text encoder it was trained with; parts that
        differ are refused (``allow_mismatch``: a warning instead), since a denoiser only works on the latents
        and text features it was trained on."""
        path = Path(path)
        if not path.is_dir():
            raise PartError(f"pipeline folder {path} does not exist (train one with `make train-ldm`, or `make demo`)")
        missing = [p for p in (*PARTS, PIPELINE_FILE) if not (path / p).exists()]
        if missing:
            raise PartError(f"pipeline folder {path} lacks {missing}; expected {list(PARTS)} and {PIPELINE_FILE}")
        config = config_from_dict(PipelineConfig, read_json(path / PIPELINE_FILE), str(path / PIPELINE_FILE))
        vae, text_encoder = load_part(path / "vae", kind="vae"), load_part(path / "text_encoder", kind="text_encoder")
        denoiser = load_part(path / DENOISER_DIR, kind="denoiser")
        check_trained_together(path, part_metadata(path / DENOISER_DIR).get("_trained_with"),
                               {"vae": weights_hash(vae), "text_encoder": weights_hash(text_encoder)}, allow_mismatch)
        pipe = cls(vae, text_encoder, denoiser, load_schedule(path / "scheduler"), config)
        return pipe.to(device, dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        save_part(self.vae, path / "vae")
        save_part(self.text_encoder, path / "text_encoder")
        trained_with = {"vae": weights_hash(self.vae), "text_encoder": weights_hash(self.text_encoder)}
        save_part(self.denoiser, path / DENOISER_DIR, {"_trained_with": trained_with})
        save_schedule(self.schedule, path / "scheduler")
        write_json(path / PIPELINE_FILE, {"_ldm_version": __version__, **asdict(self.config)})
        return path

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextToImagePipeline:
        for part in (self.vae, self.text_encoder, self.denoiser):
            part.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # ---- generation ------------------------------------------------------------------------------
    def _check_request(self, prompts: Sequence[str], steps: int, guidance: float, height: int, width: int,
                       n_per_prompt: int, sampler: str) -> None:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings ('' is the unconditional prompt)")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps}")
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be >= 0 (1 = no guidance, 0 = unconditional), got {guidance}")
        if n_per_prompt < 1:
            raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: use one of {list(SAMPLERS)}")
        f = self.vae.config.downsample_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"height and width must be positive multiples of the VAE factor {f}, got {height}x{width}")

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], negative_prompt: str | None = None, steps: int | None = None,
                 guidance: float | None = None, sampler: str | None = None, seed: int = 0,
                 height: int | None = None, width: int | None = None, n_per_prompt: int = 1,
                 batch_size: int = 64, guidance_rescale: float | None = None, progress: bool = True,
                 **sampler_options: Any) -> torch.Tensor:
        """Images (len(prompts)·n_per_prompt, 3, H, W) in [-1, 1], prompt-major order.

        The initial noise of image i depends only on (seed, i), so the batch size does not change it.
        """
        c = self.config
        steps = c.steps if steps is None else steps
        guidance = c.guidance if guidance is None else guidance
        sampler = sampler or c.sampler
        height, width = height or c.height, width or c.width
        rescale = c.guidance_rescale if guidance_rescale is None else guidance_rescale
        self._check_request(prompts, steps, guidance, height, width, n_per_prompt, sampler)
        f, zc = self.vae.config.downsample_factor, self.vae.config.z_channels
        all_prompts = [p for p in prompts for _ in range(n_per_prompt)]
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(all_prompts), zc, height // f, width // f), generator=gen)
        if self.schedule.prior_std != 1.0:  # VE: the prior N(0, σ_max² I)
            noise = noise * self.schedule.prior_std
        sample_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        uncond = self.condition([negative_prompt or ""])
        batches = range(0, len(all_prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"sampling ({sampler}, {steps} steps)", unit="batch")
        images = []
        for start in batches:
            cond = self.condition(all_prompts[start:start + batch_size])
            model_fn = self.model_fn(cond, uncond, guidance, rescale)
            x_T = noise[start:start + batch_size].to(self.device, self.dtype)
            z0 = sample(model_fn, x_T, self.schedule, steps, sampler=sampler, generator=sample_gen, **sampler_options)
            images.append(self.vae.decode_latents(z0).clamp(-1, 1).float().cpu())
        return torch.cat(images)

    def model_fn(self, cond: Conditioning, uncond: Conditioning | None = None, guidance: float = 1.0,
                 rescale: float = 0.0) -> ModelFn:
        """The samplers' ``model_fn(x_t, t)``: the (guided) denoiser fed ``schedule.scale_model_input(x_t, t)``
        (the identity for VP schedules). The one place the pipeline turns its denoiser into a model function."""
        guided = guided_model(self.denoiser, cond, uncond if uncond is not None else cond, guidance, rescale)
        schedule = self.schedule

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided(schedule.scale_model_input(x, t), t)

        return fn

    def condition(self, prompts: Sequence[str]) -> Conditioning:
        """The denoiser's conditioning for ``prompts``, padding columns cut (exact: masked cross-attention and a
        causal text tower)."""
        return conditioning_for(self.denoiser, self.text_encoder.condition(prompts).trim())

    def __call__(self, prompts: Sequence[str], **kwargs: Any) -> list[Image.Image]:
        """``generate`` returning PIL images (prompt-major order)."""
        return to_pil(self.generate(prompts, **kwargs))
