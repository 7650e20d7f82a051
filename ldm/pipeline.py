"""Text → image: encode the prompt, run a sampler on VAE latents with classifier-free guidance, decode.

``TextToImagePipeline.from_pretrained(dir)`` loads a pipeline folder (diffusers-like layout)::

    vae/ text_encoder/ unet/     exported parts (config.json + model.safetensors, see ldm.io); unet/ holds
                                 the denoiser whatever its class (the name is diffusers')
    scheduler/config.json        the training noise schedule (and the model's prediction type)
    pipeline.json                image size and sampling defaults

No Lightning and no webdataset are imported here. The generation is LDM eq. 3 at inference:
z_T ~ N(0, I) → sampler(ε_θ(z_t, t, τ_θ(y)) with CFG) → x = D(z_0 / scale + shift), optionally with classifier
guidance (``ldm.diffusion.guidance``) and an image edit (``ldm.editing``: img2img, inversion, inpainting,
colourisation), and a per-step callback.

The denoiser runs in inference mode on the fast path of ``ldm.fastpath`` (``precision``: "auto" measures fp32
against bf16 autocast and the attention kernels once per machine and batch shape; "fp32" / "bf16" fix it). What the
denoiser computes from the text alone (a context refiner, cross-attention keys and values) is computed once per batch
of prompts, not once per step (``ldm.modules.reuse``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ldm import __version__
from ldm.conditioning import Conditioning
from ldm.diffusion.guidance import classifier_guidance, clip_denoised, guided_model
from ldm.diffusion.objectives import standard_normal
from ldm.diffusion.samplers import SAMPLERS, ModelFn, sample
from ldm.diffusion.schedules import NoiseSchedule, build_schedule
from ldm.editing import ImageEdit
from ldm.errors import UsageError
from ldm.fastpath import FastPath, check_precision, choose, denoiser_workload, prepared_probes
from ldm.io import (
    CONFIG_NAME,
    PartError,
    config_from_dict,
    load_part,
    part_metadata,
    read_json,
    save_part,
    weights_hash,
    write_json,
)
from ldm.modules.denoiser import check_compatible, conditioning_for, latent_size_problem
from ldm.modules.reuse import reuse_text_work
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
    spacing: str = "trailing"          # sampling timestep spacing (DiscreteSchedule.timesteps)
    clip_denoised: bool = False        # clip x̂0 to [−1, 1] while sampling (pixel-space pipelines, as DDPM/iDDPM)
    sizes: list[list[int]] | None = None  # other [height, width] the denoiser was trained at (aspect buckets)
    # a consistency model (LCM student, or a base with an LCM-LoRA): maps any x_t to x_0, samples with `lcm`
    consistency_model: bool = False


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


# denoiser config.json keys that are not provenance carried from one export to the next
_PART_KEYS = ("_class_name", "_ldm_version", "_weights_sha256", "_trained_with")


def _inference(generate: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run ``generate`` in inference mode (no autograd bookkeeping, no version counters) and hand back an ordinary
    tensor; under ``no_grad`` instead when classifier guidance is on (its gradient is taken inside the call) or a
    callback is given (the tensors it receives must be usable anywhere, in autograd too)."""
    signature = inspect.signature(generate)

    @functools.wraps(generate)
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        given = signature.bind(*args, **kwargs).arguments
        guided = given.get("classifier") is not None and given.get("classifier_scale", 0.0) != 0.0
        if guided or given.get("callback") is not None:
            with torch.no_grad():
                return generate(*args, **kwargs)
        with torch.inference_mode():
            images = generate(*args, **kwargs)
        return images.clone()  # outside inference mode: an ordinary tensor (a copy of the small image batch)

    return run


class TextToImagePipeline:
    """The three frozen parts + schedule, callable as ``pipe(prompts) -> list[PIL.Image]``.

    ``denoiser`` is any denoiser (``ldm.modules.denoiser``): the pipeline never names its class.
    ``provenance``: ``_``-prefixed keys recorded beside the denoiser (e.g. ``_init_from``: the pipeline a
    fine-tuning started from), read by ``from_pretrained`` and written again by ``save_pretrained``.
    ``precision`` ("auto" | "fp32" | "bf16") is the denoiser's default fast-path setting
    (see ``ldm.fastpath``).
    """

    def __init__(self, vae: torch.nn.Module, text_encoder: torch.nn.Module, denoiser: torch.nn.Module,
                 schedule: NoiseSchedule, config: PipelineConfig | None = None,
                 provenance: dict[str, Any] | None = None, precision: str = "auto"):
        self.vae, self.text_encoder, self.denoiser, self.schedule = vae, text_encoder, denoiser, schedule
        self.config = config or PipelineConfig()
        self.provenance = {k if k.startswith("_") else f"_{k}": v for k, v in (provenance or {}).items()}
        self.precision = check_precision(precision)
        self.last_fast_path: FastPath | None = None  # the fast path the last generate() ran on
        self._check_compatible()
        for part in (vae, text_encoder, denoiser):
            part.eval().requires_grad_(False)

    # ---- construction ----------------------------------------------------------------------------
    def _check_compatible(self) -> None:
        f = self.vae.config.downsample_factor
        if self.config.height % f or self.config.width % f:
            raise PartError(f"pipeline size {self.config.height}x{self.config.width} "
                            f"is not divisible by the vae factor {f}")
        problems = check_compatible(self.denoiser.config, self.vae.config.z_channels, self.text_encoder.token_dim,
                                    self.text_encoder.pooled_dim, (self.config.height // f, self.config.width // f))
        if problems:
            raise PartError(f"the denoiser does not fit these parts ({'; '.join(problems)}): "
                            "they were not trained together")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, allow_mismatch: bool = False,
                        meta_init: bool = False) -> TextToImagePipeline:
        """Load a pipeline folder; a missing or mismatched part is an error naming it.

        The denoiser records the weight hashes of the VAE and text encoder it was trained with; parts that
        differ are refused (``allow_mismatch``: a warning instead), since a denoiser only works on the latents
        and text features it was trained on. ``meta_init``: the weights keep their file dtype and nothing is
        initialised (``ldm.io.load_part``), for conversions; such a pipeline cannot generate."""
        path = Path(path)
        if not path.is_dir():
            raise PartError(f"pipeline folder {path} does not exist (train one with `make train-ldm`, or `make demo`)")
        missing = [p for p in (*PARTS, PIPELINE_FILE) if not (path / p).exists()]
        if missing:
            raise PartError(f"pipeline folder {path} lacks {missing}; expected {list(PARTS)} and {PIPELINE_FILE}")
        config = config_from_dict(PipelineConfig, read_json(path / PIPELINE_FILE), str(path / PIPELINE_FILE))
        vae = load_part(path / "vae", kind="vae", meta_init=meta_init)
        text_encoder = load_part(path / "text_encoder", kind="text_encoder", meta_init=meta_init)
        denoiser = load_part(path / DENOISER_DIR, kind="denoiser", meta_init=meta_init)
        metadata = part_metadata(path / DENOISER_DIR)
        check_trained_together(path, metadata.get("_trained_with"),
                               {"vae": weights_hash(vae), "text_encoder": weights_hash(text_encoder)}, allow_mismatch)
        provenance = {k: v for k, v in metadata.items() if k not in _PART_KEYS}
        pipe = cls(vae, text_encoder, denoiser, load_schedule(path / "scheduler"), config, provenance)
        return pipe.to(device, dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        save_part(self.vae, path / "vae")
        save_part(self.text_encoder, path / "text_encoder")
        trained_with = {"vae": weights_hash(self.vae), "text_encoder": weights_hash(self.text_encoder)}
        save_part(self.denoiser, path / DENOISER_DIR, {**self.provenance, "_trained_with": trained_with})
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
        if sampler == "lcm" and not self.config.consistency_model:
            raise UsageError("sampler 'lcm' needs a consistency-distilled model (`make train-lcm`, or an LCM-LoRA "
                             "through --lora); this pipeline is a diffusion model: use dpmpp-2m, ddim, euler, ...")
        f = self.vae.config.downsample_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"height and width must be positive multiples of the VAE factor {f}, got {height}x{width}")
        if problem := latent_size_problem(self.denoiser.config, height // f, width // f):
            raise ValueError(f"height x width {height}x{width} does not fit the denoiser: {problem}; sample at "
                             f"{self.config.height}x{self.config.width} (pipeline.json)")

    @_inference
    def generate(self, prompts: Sequence[str], negative_prompt: str | None = None, steps: int | None = None,
                 guidance: float | None = None, sampler: str | None = None, seed: int = 0,
                 height: int | None = None, width: int | None = None, n_per_prompt: int = 1,
                 batch_size: int = 64, guidance_rescale: float | None = None, progress: bool = True,
                 edit: ImageEdit | None = None, classifier: torch.nn.Module | None = None,
                 classifier_scale: float = 0.0,
                 classifier_labels: dict[str, str] | Sequence[dict[str, str]] | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None, only_index: int | None = None,
                 clip_denoised: bool | None = None, precision: str | None = None,
                 **sampler_options: Any) -> torch.Tensor:
        """Images (len(prompts)·n_per_prompt, 3, H, W) in [-1, 1], prompt-major order.

        A w-conditioned denoiser (a distilled LCM student) gets ``guidance`` as an input and runs without a CFG
        batch (``ldm.diffusion.guidance.guided_model``); ``sampler="lcm"`` needs ``config.consistency_model``.
        The initial noise of image i depends only on (seed, i), so the batch size does not change it; a stochastic
        sampler's noise is drawn per batch from seed + 1 + (index of the batch's first image).

        edit: an :class:`ldm.editing.ImageEdit` (img2img, inversion, inpainting, colourisation).
        classifier / classifier_scale / classifier_labels: classifier guidance (``guidance.classifier_guidance``)
            with a ``LatentClassifier`` towards labels (one dict for every image, or one per prompt), on top of CFG.
        callback: called after every sampler step with the sampler's ``{"i", "t", "x", "x0"}`` plus ``"phase"``
            ("invert" or "sample"), ``"batch"`` (index of the batch's first image), ``"step"`` and ``"total"``
            (steps done and to do in this call): a progress bar or previews (:meth:`decode` of ``x0``).
        only_index: generate only the batch that holds image ``only_index`` and return that image (1, 3, H, W),
            exactly as the whole call makes it (what ``ldm generate --from-png`` reproduces).
        precision: overrides the pipeline's fast-path setting (``ldm.fastpath``) for this call; the fast path is
            chosen on the first batch and kept for the whole call. The call runs in inference mode (no autograd
            bookkeeping), except with classifier guidance or a callback (then under ``no_grad``).
        """
        c = self.config
        steps = c.steps if steps is None else steps
        guidance = c.guidance if guidance is None else guidance
        sampler = sampler or ("ddim" if edit is not None and edit.mode == "invert" else c.sampler)
        height, width = height or c.height, width or c.width
        rescale = c.guidance_rescale if guidance_rescale is None else guidance_rescale
        sampler_options.setdefault("spacing", c.spacing)
        self._check_request(prompts, steps, guidance, height, width, n_per_prompt, sampler)
        self._warn_untrained_size(height, width)
        if edit is not None:
            sampler = edit.sampler(sampler)
            if edit.mode == "invert" and sampler_options.get("eta"):
                raise UsageError("inversion editing needs the deterministic DDIM (eta 0)")
        f, zc = self.vae.config.downsample_factor, self.vae.config.z_channels
        all_prompts = [p for p in prompts for _ in range(n_per_prompt)]
        if only_index is not None and not 0 <= only_index < len(all_prompts):
            raise ValueError(f"only_index {only_index} is not an image of this request (0..{len(all_prompts) - 1})")
        targets = self._classifier_targets(classifier, classifier_scale, classifier_labels, prompts, n_per_prompt,
                                           height // f)
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(all_prompts), zc, height // f, width // f), generator=gen)
        if self.schedule.prior_std != 1.0:  # VE: the prior N(0, σ_max² I)
            noise = noise * self.schedule.prior_std
        ts = self.schedule.timesteps(steps, sampler_options.pop("spacing", "trailing"))
        if edit is not None:
            edit.prepare(self, height, width)
            ts = edit.timesteps(ts)
        uncond = self.condition([negative_prompt or ""], height, width)
        starts = list(range(0, len(all_prompts), batch_size))
        if only_index is not None:
            starts = [only_index // batch_size * batch_size]
        resample = edit.resample if edit is not None else 0
        inverting = edit is not None and edit.mode == "invert"
        total = len(starts) * (len(ts) * (1 + inverting) + resample * (len(ts) - len(ts) // 2))
        reporter = StepReporter(total, callback, progress, f"sampling ({sampler}, {len(ts)} steps)")
        images, fast, denoiser = [], None, self.denoiser
        for start in starts:
            end = min(start + batch_size, len(all_prompts))
            cond = self.condition(all_prompts[start:end], height, width)
            x = noise[start:end].to(self.device, self.dtype)
            if fast is None:  # chosen on the first batch, kept for the whole call
                fast = self.fast_path(cond, uncond, guidance, rescale, x, precision or self.precision,
                                      log=reporter.write if progress else None)
                denoiser = fast.prepare(self.denoiser)
            model_fn = self.model_fn(cond, uncond, guidance, rescale,
                                     clip=c.clip_denoised if clip_denoised is None else clip_denoised,
                                     denoiser=denoiser)
            if targets is not None:
                batch_targets = {k: v[start:end] for k, v in targets.items()}
                model_fn = classifier_guidance(
                    model_fn, lambda x, t, y=batch_targets: classifier.log_prob(x, t, y), classifier_scale,
                    self.schedule)
            sample_gen = torch.Generator(device=self.device).manual_seed(seed + 1 + start)
            with fast.context(self.device), reuse_text_work():  # text-only work once per batch, not per step
                z0 = self._sample_batch(model_fn, x, ts, steps, sampler, sample_gen, edit, resample, reporter, start,
                                        sampler_options)
            out = self.vae.decode_latents(z0)
            if edit is not None:
                out = edit.finish(out)
            images.append(out.clamp(-1, 1).float().cpu())
        reporter.close()
        self.last_fast_path = fast
        result = torch.cat(images)
        return result[only_index - starts[0]:only_index - starts[0] + 1] if only_index is not None else result

    def _sample_batch(self, model_fn: Callable, x: torch.Tensor, ts: torch.Tensor, steps: int, sampler: str,
                      sample_gen: torch.Generator, edit: ImageEdit | None, resample: int, reporter: StepReporter,
                      start: int, sampler_options: dict[str, Any]) -> torch.Tensor:
        """One batch of :meth:`generate` on the fast path: (edit start,) sampling (, resampling); the latents."""
        if edit is not None:
            model_fn = edit.wrap(model_fn, self.schedule)
            with reporter.phase("invert", start):
                x = edit.start(self, x, ts, steps, callback=reporter)
        z0 = x
        if len(ts):
            with reporter.phase("sample", start):
                z0 = sample(model_fn, x, self.schedule, None, sampler=sampler, timesteps=ts, generator=sample_gen,
                            callback=reporter, **sampler_options)
            for _ in range(resample):  # RePaint-style: back to the middle of the run, inpaint again
                tail = ts[len(ts) // 2:]
                x = edit.renoise(self, z0, standard_normal(z0.shape, z0, sample_gen), tail)
                with reporter.phase("resample", start):
                    z0 = sample(model_fn, x, self.schedule, None, sampler=sampler, timesteps=tail,
                                generator=sample_gen, callback=reporter, **sampler_options)
        return z0

    def _classifier_targets(self, classifier: torch.nn.Module | None, scale: float,
                            labels: dict[str, str] | Sequence[dict[str, str]] | None, prompts: Sequence[str],
                            n_per_prompt: int, latent_side: int) -> dict[str, torch.Tensor] | None:
        """Class indices per image for classifier guidance (None when it is off); bad labels are UsageErrors."""
        if not math.isfinite(scale) or scale < 0:
            raise UsageError(f"classifier scale must be >= 0, got {scale}")
        if classifier is None or scale == 0:
            if scale and classifier is None:
                raise UsageError("a classifier scale needs a classifier (a LatentClassifier part)")
            return None
        if not labels:
            raise UsageError("classifier guidance needs labels to guide towards (e.g. color=red)")
        if classifier.config.in_channels != self.vae.config.z_channels or classifier.config.resolution != latent_side:
            raise UsageError(f"the classifier reads {classifier.config.in_channels}x{classifier.config.resolution}² "
                             f"latents; this request makes {self.vae.config.z_channels}x{latent_side}²")
        rows = [labels] * len(prompts) if isinstance(labels, dict) else list(labels)
        if len(rows) != len(prompts):
            raise UsageError(f"give one label set for all prompts or one per prompt ({len(prompts)}), got {len(rows)}")
        try:
            return classifier.targets([r for r in rows for _ in range(n_per_prompt)])
        except ValueError as e:
            raise UsageError(str(e)) from None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from diffusion-space latents (a preview of a callback's ``x0``)."""
        with torch.no_grad():
            return self.vae.decode_latents(latents.to(self.device, self.dtype)).clamp(-1, 1).float().cpu()

    def model_fn(self, cond: Conditioning, uncond: Conditioning | None = None, guidance: float = 1.0,
                 rescale: float = 0.0, clip: bool = False, denoiser: torch.nn.Module | None = None) -> ModelFn:
        """The samplers' ``model_fn(x_t, t)``: the (guided) denoiser fed ``schedule.scale_model_input(x_t, t)``
        (the identity for VP schedules), with x̂0 clipped to [−1, 1] when ``clip`` (``guidance.clip_denoised``).
        The one place the pipeline turns its denoiser into a model function; likelihoods use it unclipped.
        ``denoiser``: the one to run (default the pipeline's; a fast path's :meth:`~ldm.fastpath.FastPath.prepare`)."""
        guided = guided_model(denoiser if denoiser is not None else self.denoiser, cond,
                              uncond if uncond is not None else cond, guidance, rescale)
        schedule = self.schedule

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided(schedule.scale_model_input(x, t), t)

        return clip_denoised(fn, schedule, schedule.prediction_type) if clip else fn

    def fast_path(self, cond: Conditioning, uncond: Conditioning, guidance: float, rescale: float, x: torch.Tensor,
                  precision: str, log: Callable[[str], None] | None = None) -> FastPath:
        """The fast path of sampling with this guidance on latents like ``x`` (measured once per machine and shape:
        each candidate times the guided model function on its own prepared denoiser; one that needs more memory
        than fp32 is not taken)."""
        workload = {**denoiser_workload(self.denoiser, x, cond, "sample"),
                    "guided": not (guidance == 1.0 and rescale == 0.0)}
        workload["tokens"] = workload["tokens"][2:]  # the prompts' length varies from call to call: not part of it
        t = torch.full((x.shape[0],), self.schedule.num_train_timesteps / 2, device=x.device)

        def guided_step(denoiser: torch.nn.Module) -> Callable[[], torch.Tensor]:  # one call of the sampler's model_fn
            return functools.partial(self.model_fn(cond, uncond, guidance, rescale, denoiser=denoiser), x, t)

        run, memory = prepared_probes(self.denoiser, guided_step, self.device)
        return choose(precision, workload, run, self.device, log=log, memory=memory)

    def condition(self, prompts: Sequence[str], height: int | None = None, width: int | None = None) -> Conditioning:
        """The denoiser's conditioning for ``prompts``, padding columns cut (exact: masked cross-attention and a
        causal text tower), with the size/crop extras it asks for at their defaults for ``height``×``width``
        (SDXL micro-conditioning, ``ldm.modules.micro``; default: the training size)."""
        from ldm.modules.micro import with_default_extras

        cond = conditioning_for(self.denoiser, self.text_encoder.condition(prompts).trim())
        return with_default_extras(self.denoiser, cond, height or self.config.height, width or self.config.width)

    def _warn_untrained_size(self, height: int, width: int) -> None:
        """Generating at a size the denoiser never trained at works (it is convolutional) but may repeat or
        break up objects: say so once per call."""
        trained = [[self.config.height, self.config.width]] + [list(s) for s in self.config.sizes or []]
        if [height, width] not in trained:
            warnings.warn(f"generating at {height}x{width} but the denoiser was trained at "
                          f"{' / '.join(f'{h}x{w}' for h, w in trained)}: other sizes work but may repeat or cut "
                          "objects (train at that size, or resume at it: ldm fit --continue-from)", UserWarning,
                          stacklevel=3)

    def __call__(self, prompts: Sequence[str], **kwargs: Any) -> list[Image.Image]:
        """``generate`` returning PIL images (prompt-major order)."""
        return to_pil(self.generate(prompts, **kwargs))


class StepReporter:
    """The per-step callback the samplers get: counts steps, moves a progress bar, and forwards each step to the
    user's callback with the phase, batch and counts added."""

    def __init__(self, total: int, callback: Callable[[dict[str, Any]], None] | None, progress: bool, desc: str):
        self.total, self.done, self.callback = total, 0, callback
        self.context: dict[str, Any] = {}
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step")

    @contextlib.contextmanager
    def phase(self, name: str, batch: int) -> Iterator[None]:
        self.context = {"phase": name, "batch": batch}
        yield

    def __call__(self, info: dict[str, Any]) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback({**info, **self.context, "step": self.done, "total": self.total})

    def write(self, message: str) -> None:
        """A line on stderr that leaves the progress bar intact."""
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
