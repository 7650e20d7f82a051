"""Text → image: encode the prompt, run a sampler on VAE latents with classifier-free guidance, decode.

``TextToImagePipeline.from_pretrained(dir)`` loads a pipeline folder (diffusers-like layout)::

    vae/ text_encoder/ unet/     exported parts (config.json + model.safetensors, see ldm.io)
    scheduler/config.json        the training noise schedule (and the model's prediction type)
    pipeline.json                image size and sampling defaults

No Lightning and no webdataset are imported here. The generation is LDM eq. 3 at inference:
z_T ~ N(0, I) → sampler(ε_θ(z_t, t, τ_θ(y)) with CFG) → x = D(z_0 / scale + shift).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ldm import __version__
from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.io import PartError, config_from_dict, load_part, read_json, save_part, write_json
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.text_encoder import CLIPTextConditioner
from ldm.modules.unet import UNet

PIPELINE_FILE = "pipeline.json"
PARTS = ("vae", "text_encoder", "unet", "scheduler")


@dataclass
class PipelineConfig:
    """Image size the U-Net was trained at and the sampling defaults (``pipeline.json``)."""

    height: int = 32
    width: int = 32
    steps: int = 20
    guidance: float = 4.0
    sampler: str = "dpmpp-2m"
    guidance_rescale: float = 0.0


class TextToImagePipeline:
    """The three frozen parts + schedule, callable as ``pipe(prompts) -> list[PIL.Image]``."""

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextConditioner, unet: UNet,
                 schedule: DiscreteSchedule, config: PipelineConfig | None = None):
        self.vae, self.text_encoder, self.unet, self.schedule = vae, text_encoder, unet, schedule
        self.config = config or PipelineConfig()
        self._check_compatible()
        for part in (vae, text_encoder, unet):
            part.eval().requires_grad_(False)

    # ---- construction ----------------------------------------------------------------------------
    def _check_compatible(self) -> None:
        uc, vc = self.unet.config, self.vae.config
        if uc.in_channels != vc.z_channels or uc.out_channels != vc.z_channels:
            raise PartError(f"unet has in/out channels {uc.in_channels}/{uc.out_channels} but the vae's latents have "
                            f"{vc.z_channels} channels: these parts were not trained together")
        if uc.context_dim != self.text_encoder.token_dim:
            raise PartError(f"unet cross-attends to {uc.context_dim}-d tokens but the text_encoder gives "
                            f"{self.text_encoder.token_dim}-d tokens: these parts were not trained together")
        if uc.pooled_dim and uc.pooled_dim != self.text_encoder.pooled_dim:
            raise PartError(f"unet is conditioned on {uc.pooled_dim}-d pooled text embeddings but the text_encoder "
                            f"gives {self.text_encoder.pooled_dim}-d ones: these parts were not trained together")
        f = vc.downsample_factor
        if self.config.height % f or self.config.width % f:
            raise PartError(f"pipeline size {self.config.height}x{self.config.width} is not divisible by the vae factor {f}")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> TextToImagePipeline:
        """Load a pipeline folder; a missing or mismatched part is an error naming it."""
        path = Path(path)
        if not path.is_dir():
            raise PartError(f"pipeline folder {path} does not exist (train one with `make train-ldm`, or `make demo`)")
        missing = [p for p in (*PARTS, PIPELINE_FILE) if not (path / p).exists()]
        if missing:
            raise PartError(f"pipeline folder {path} lacks {missing}; expected {list(PARTS)} and {PIPELINE_FILE}")
        config = config_from_dict(PipelineConfig, read_json(path / PIPELINE_FILE), str(path / PIPELINE_FILE))
        pipe = cls(load_part(path / "vae", AutoencoderKL), load_part(path / "text_encoder", CLIPTextConditioner),
                   load_part(path / "unet", UNet), DiscreteSchedule.load(path / "scheduler"), config)
        return pipe.to(device, dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        save_part(self.vae, path / "vae")
        save_part(self.text_encoder, path / "text_encoder")
        save_part(self.unet, path / "unet")
        self.schedule.save(path / "scheduler")
        write_json(path / PIPELINE_FILE, {"_ldm_version": __version__, **asdict(self.config)})
        return path

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextToImagePipeline:
        for part in (self.vae, self.text_encoder, self.unet):
            part.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

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
        sample_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        uncond, uncond_pooled, uncond_mask = self.text_encoder.encode_text([negative_prompt or ""], return_mask=True)
        use_pooled = bool(getattr(self.unet.config, "pooled_dim", None))
        batches = range(0, len(all_prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"sampling ({sampler}, {steps} steps)", unit="batch")
        images = []
        for start in batches:
            chunk = all_prompts[start:start + batch_size]
            cond, cond_pooled, cond_mask = self.text_encoder.encode_text(chunk, return_mask=True)
            # Cut padding columns no mask keeps: exact, since cross-attention ignores masked keys and the
            # causal text tower makes real tokens independent of the padding after them.
            keep = max(int(cond_mask.sum(1).max()), int(uncond_mask.sum(1).max()))
            model_fn = classifier_free_guidance(
                self.unet, cond[:, :keep], uncond[:, :keep], guidance, rescale,
                cond_mask=cond_mask[:, :keep], uncond_mask=uncond_mask[:, :keep],
                cond_pooled=cond_pooled if use_pooled else None, uncond_pooled=uncond_pooled if use_pooled else None)
            x_T = noise[start:start + batch_size].to(self.device, self.dtype)
            z0 = sample(model_fn, x_T, self.schedule, steps, sampler=sampler, generator=sample_gen, **sampler_options)
            images.append(self.vae.decode_latents(z0).clamp(-1, 1).float().cpu())
        return torch.cat(images)

    def __call__(self, prompts: Sequence[str], **kwargs: Any) -> list[Image.Image]:
        """``generate`` returning PIL images (prompt-major order)."""
        return to_pil(self.generate(prompts, **kwargs))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] → list of RGB PIL images."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: Sequence[Image.Image], rows: int, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile images row-major into a grid (``rows`` rows), optionally upscaled with nearest neighbour."""
    if not images:
        raise ValueError("no images to tile")
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img.resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
