"""Editing an image with the text-to-image model: img2img (SDEdit), DDIM-inversion editing, inpainting and
colourisation, all as conditional sampling (the lectures' inverse problems: sample p(x | y) for a known y = A x).

One :class:`ImageEdit` describes the edit; ``TextToImagePipeline.generate(..., edit=...)`` asks it for the
timesteps to run, the latent to start from, a wrapper of the sampler's ``model_fn`` and a last touch on the images.
Every sampler works unchanged, because everything happens at the start and inside ``model_fn``:

* **img2img / SDEdit** (Meng et al. 2022, §3.2; the VP-SDE form of its algorithm): encode the image, z = E(x), perturb
  it to t₀ with q(z_t₀ | z) = N(α_t₀ z, σ_t₀² I) (DDPM eq. 4) and solve the reverse process from t₀. ``strength`` ∈
  [0, 1] picks t₀: of the N sampling timesteps the last ⌊strength·N⌋ run (as diffusers does). Strength 0 runs none
  and returns D(E(x)); strength 1 starts from the pure noise text-to-image starts from (the usual N(0, I) ≈
  q(z_T | z) approximation), so it *is* text-to-image with the same seed.
* **inversion editing** (Song et al. 2021a, DDIM eq. 12 run backwards; see ``samplers.ddim_invert``): the image's
  latent is carried to t₀ along the deterministic DDIM path of the *source* prompt (each step solved by two
  fixed-point iterations, so it inverts the forward step almost exactly), then DDIM (η = 0) runs forward with the
  new prompt. With the same prompt and guidance 1 it returns (nearly) the input.
* **inpainting**: the unknown region (white in the mask) is generated, the known one kept. At every model call the
  prediction x̂0 is replaced by the known latent where the image is known,
  x̂0' = m ⊙ z + (1 − m) ⊙ x̂0 — the range/null-space rectification of DDNM (Wang et al. 2023, §3.1 and
  Algorithm 1, with A = the known-pixel mask) — and ε̂' = (x_t − α_t x̂0')/σ_t is re-expressed as the model's
  output. Every sampler whose step is linear in (x_t, x̂0) and exact on the forward path (DDIM, DPM-Solver++,
  Euler, Heun) then keeps the known region at α_s z + σ_s ε after *every* step, ε the run's noise: the latent
  blending of RePaint / Blended Latent Diffusion (Lugmayr et al. 2022, eq. 8; Avrahami et al. 2023, Algorithm 1)
  — replace the known region by the noised known latent — with one noise draw per run. The known region of the
  result is exactly z; as the decoder's GroupNorm and receptive field reach across the whole latent, the pixels
  of kept latent cells are then set to the reconstruction D(z) itself (a latent cell is kept only when none of
  its pixels is masked), so the unmasked region equals the input's reconstruction exactly.
  ``resample`` > 0 adds RePaint-style resampling (Lugmayr et al. 2022, §4.2):
  the result is re-noised to the run's middle timestep and the second half runs again, that many times (one
  jump back of N/2 steps), so the generated part can agree with the known one.
* **colourisation**: y = A x is the luminance Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601) of a grey image. At
  every model call x̂0 is decoded, projected onto {x : A x = y} by x' = x + A⁻(y − A x) with A⁻ = (1, 1, 1)ᵀ (a
  generalised inverse: A A⁻ = 1, so A x' = y exactly, and the chroma differences R − G, B − G are kept; DDNM §3.2
  uses the same decomposition for colourisation) and encoded again; the decoded result gets the same projection,
  so its luminance is the grey image's (up to the [-1, 1] clamp and rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ldm.diffusion.objectives import normalize_prediction_type, predict_x0_eps, training_target
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.errors import UsageError

if TYPE_CHECKING:  # the pipeline imports this module
    from ldm.pipeline import TextToImagePipeline

ModelFn = Callable[[Tensor, Tensor], Tensor]
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights
MODES = ("img2img", "invert", "inpaint", "colorize")
DEFAULT_STRENGTH = {"img2img": 0.75, "invert": 1.0, "inpaint": 1.0, "colorize": 1.0}
INVERT_ITERS = 2  # fixed-point iterations per inversion step (samplers.ddim_invert): a near-exact DDIM inverse


# ---- images in ------------------------------------------------------------------------------------------
def read_image(path: str | Path, what: str = "image") -> Image.Image:
    """An image file as RGB; a missing or unreadable file is a one-line :class:`UsageError` naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{what} {path} is not a readable image ({e})") from None


def image_tensor(image: Image.Image, height: int, width: int) -> Tensor:
    """(1, 3, H, W) in [-1, 1], resized to ``height``×``width`` (Lanczos; box filter when shrinking by an integer)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def mask_tensor(image: Image.Image, height: int, width: int) -> Tensor:
    """(1, 1, H, W) of {0, 1}: 1 where the mask is light (grey > 127: repaint), 0 where it is dark (keep); an alpha
    channel counts as transparent = keep."""
    grey = image.convert("L")
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.BOX)
    return torch.from_numpy((np.asarray(grey) > 127).astype(np.float32))[None, None]


def luminance(images: Tensor) -> Tensor:
    """Y = 0.299 R + 0.587 G + 0.114 B (BT.601) of (B, 3, H, W) images: (B, 1, H, W), same value range."""
    w = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
    return (images * w[None, :, None, None]).sum(1, keepdim=True)


def project_luminance(images: Tensor, target: Tensor) -> Tensor:
    """x + A⁻(y − A x) with A = the BT.601 luma row and A⁻ = (1, 1, 1)ᵀ: the same offset on R, G and B, so the
    luminance becomes ``target`` exactly and the colour differences stay (see the module docstring)."""
    return images + (target - luminance(images))


# ---- the x̂0 rectification (DDNM) as a model_fn wrapper ---------------------------------------------------
def rectify_x0(model_fn: ModelFn, project: Callable[[Tensor, Tensor], Tensor], schedule: DiscreteSchedule,
               prediction_type: str | None = None) -> ModelFn:
    """``model_fn`` whose implied x̂0 is replaced by ``project(x̂0, t)`` at fixed x_t: ε̂' = (x_t − α x̂0')/σ
    (DDPM eq. 4), re-expressed as the model's output type (``objectives.training_target``). DDNM (Wang et al.
    2023, Algorithm 1) rectifies x̂0|t this way inside the DDPM/DDIM update; as a model_fn wrapper it works in
    every sampler."""
    kind = normalize_prediction_type(prediction_type or schedule.prediction_type)

    def rectified(x: Tensor, t: Tensor) -> Tensor:
        out = model_fn(x, t)
        alpha, sigma = schedule.alpha_sigma(t, like=x)
        x0, _ = predict_x0_eps(out, x, alpha, sigma, kind)
        x0 = project(x0, t)
        return training_target(x0, (x - alpha * x0) / sigma, alpha, sigma, kind)

    return rectified


# ---- the edit -----------------------------------------------------------------------------------------------
@dataclass
class ImageEdit:
    """What to do with ``image``: see the module docstring for each ``mode``.

    image: the init image (PIL); resized to the generation size.
    mode: "img2img", "invert", "inpaint" or "colorize".
    strength: fraction of the sampling steps that run, from the matching noise level (None: the mode's default,
        0.75 for img2img and 1 otherwise).
    mask: inpainting mask (PIL; light = repaint, dark = keep).
    source_prompt: the prompt the image is inverted with (``invert``; "" = unconditional).
    resample: RePaint-style resampling rounds for inpainting (0 = none).
    """

    image: Image.Image
    mode: str = "img2img"
    strength: float | None = None
    mask: Image.Image | None = None
    source_prompt: str = ""
    resample: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown edit mode {self.mode!r}: use one of {list(MODES)}")
        if self.strength is None:
            self.strength = DEFAULT_STRENGTH[self.mode]
        if not isinstance(self.strength, (int, float)) or not math.isfinite(self.strength) \
                or not 0.0 <= self.strength <= 1.0:
            raise UsageError(f"strength must be a number in [0, 1], got {self.strength}")
        if (self.mask is not None) != (self.mode == "inpaint"):
            raise UsageError("a mask goes with inpainting and only with it (give the init image and the mask)")
        if self.resample < 0 or (self.resample and self.mode != "inpaint"):
            raise UsageError(f"resample is a number of inpainting rounds >= 0, got {self.resample} for {self.mode}")
        self._z: Tensor | None = None

    # -- set-up for one generation size ---------------------------------------------------------------------
    def prepare(self, pipe: TextToImagePipeline, height: int, width: int) -> None:
        """Encode the image (the posterior mode), and build the latent mask / the luminance target."""
        vae, f = pipe.vae, pipe.vae.config.downsample_factor
        x = image_tensor(self.image, height, width).to(pipe.device, pipe.dtype)
        if self.mode == "colorize":
            self.target = luminance(x)
            x = self.target.expand(-1, 3, -1, -1)  # the grey image is what is known
        with torch.no_grad():
            self._z = vae.encode_latents(x)
        self.pixels = x
        if self.mode == "inpaint":
            m = mask_tensor(self.mask, height, width).to(pipe.device, pipe.dtype)
            self.known = 1 - F.max_pool2d(m, f)  # a latent cell is kept only if none of its pixels is repainted
            self.keep_pixels = F.interpolate(self.known, scale_factor=f, mode="nearest")
            with torch.no_grad():
                self.reconstruction = vae.decode_latents(self._z)
        self._vae = vae

    @property
    def latent(self) -> Tensor:
        """z = E(x) of the init image (1, C, h, w), after :meth:`prepare`."""
        if self._z is None:
            raise RuntimeError("ImageEdit.prepare(pipe, height, width) must run first")
        return self._z

    def timesteps(self, ts: Tensor) -> Tensor:
        """The last ⌊strength·N⌋ of the N sampling timesteps (SDEdit's t₀ = the first of them)."""
        k = int(math.floor(self.strength * len(ts) + 1e-9))
        return ts[len(ts) - k:]

    def start(self, pipe: TextToImagePipeline, noise: Tensor, ts: Tensor, full_steps: int,
              callback: Callable[[dict], None] | None = None) -> Tensor:
        """The latent at ts[0] for a batch whose text-to-image noise is ``noise``: pure noise at strength 1
        (img2img, colorize), q(z_t₀ | z) otherwise (SDEdit), the DDIM inversion of z (invert; ``callback`` sees its
        steps); for inpainting the known region always starts on α z + σ ε."""
        z = self.latent.expand(noise.shape[0], -1, -1, -1).to(noise)
        if len(ts) == 0:
            return z
        if self.mode == "invert":
            from ldm.diffusion.guidance import conditional_model
            from ldm.diffusion.samplers import ddim_invert

            h, w = (s * pipe.vae.config.downsample_factor for s in z.shape[2:])
            fn = conditional_model(pipe.denoiser, pipe.condition([self.source_prompt], h, w))
            return ddim_invert(fn, z, pipe.schedule, ts, prediction_type=pipe.schedule.prediction_type,
                               fixed_point_iters=INVERT_ITERS, callback=callback)
        if len(ts) == full_steps and self.mode in ("img2img", "colorize"):
            return noise
        return self.renoise(pipe, z, noise, ts)

    def renoise(self, pipe: TextToImagePipeline, z: Tensor, noise: Tensor, ts: Tensor) -> Tensor:
        """q(z_t | z) at t = ts[0], α z + σ ε (DDPM eq. 4); inpainting puts the known latent under the known
        region (RePaint's re-noising of a result keeps the known part exact, Lugmayr et al. 2022 §4.2)."""
        alpha, sigma = pipe.schedule.alpha_sigma(ts[:1].to(noise.device), like=noise)
        x = alpha * z + sigma * noise
        if self.mode == "inpaint":
            x = self.known * (alpha * self.latent.to(noise) + sigma * noise) + (1 - self.known) * x
        return x

    def wrap(self, model_fn: ModelFn, schedule: DiscreteSchedule) -> ModelFn:
        """Inpainting and colourisation rectify x̂0 at every model call (:func:`rectify_x0`); the others pass."""
        if self.mode == "inpaint":
            z, known = self.latent, self.known
            return rectify_x0(model_fn, lambda x0, t: known * z.to(x0) + (1 - known) * x0, schedule)
        if self.mode == "colorize":
            vae, target = self._vae, self.target

            def project(x0: Tensor, t: Tensor) -> Tensor:
                images = project_luminance(vae.decode_latents(x0), target.to(x0))
                return vae.encode_latents(images.clamp(-1, 1))

            return rectify_x0(model_fn, project, schedule)
        return model_fn

    def finish(self, images: Tensor) -> Tensor:
        """Colourisation: the decoded images take the grey image's luminance exactly (then the usual clamp).
        Inpainting: the pixels of kept latent cells are the reconstruction D(z) itself — the decoder's normalisation
        and receptive field would otherwise let the new content shift them a little."""
        if self.mode == "colorize":
            return project_luminance(images, self.target.to(images)).clamp(-1, 1)
        if self.mode == "inpaint":
            keep = self.keep_pixels.to(images)
            return keep * self.reconstruction.to(images) + (1 - keep) * images
        return images

    def sampler(self, sampler: str) -> str:
        """Inversion editing runs DDIM forward (the inverse it was encoded with); the rest keep ``sampler``."""
        if self.mode == "invert" and sampler != "ddim":
            raise UsageError(f"inversion editing samples with ddim (the inverse of its encoding), not {sampler}")
        return sampler
