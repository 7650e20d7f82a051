"""LatentDiffusion: trains a denoiser on the latents of a frozen VAE, conditioned on a frozen text encoder
(Rombach et al. 2022, eq. 3): L = E_{z=E(x), y, ε, t} w(t) ‖target(ε, z, t) − f_θ(z_t, t, τ(y))‖².

The denoiser is any registered class (``ldm.registry.DENOISERS``: the U-Net, the DiT) built from the
``denoiser:`` block of the config; its channels and conditioning widths default to the loaded parts'. The
VAE and text encoder are *exported parts* loaded from ``vae_path``/``text_encoder_path``; only the denoiser
trains. Batches come either as images + captions (``WebDataModule``; both encoders run in the step) or from
a latent cache (``LatentDataModule``; several times faster on CPU) carrying a ``Conditioning``. Captions are
dropped to "" with probability ``p_uncond`` for classifier-free guidance (Ho & Salimans 2022, through
``ldm.conditioning.drop_for_guidance``). Validation logs the loss at fixed timesteps with fixed noise, and a
sample grid of ``val_prompts`` from the EMA weights.

The same class trains pixel-space and unconditional models, and the likelihood side of the lectures:
``pixel_channels`` replaces the VAE by the identity first stage (``ldm.modules.identity_vae``; 1 = grayscale),
``unconditional`` the text encoder by one constant token (``ldm.modules.null_text``); ``learned_variance``
makes the denoiser output 2C channels (mean and v, Nichol & Dhariwal 2021 eq. 15) trained with
``loss: hybrid`` (L_simple + λ L_vlb, eq. 16); ``noise_schedule: {name: ve, ...}`` trains a VE (NCSN) model,
whose σ²-weighted denoising score matching is the ε-MSE (``objectives.dsm_loss``), the network seeing
``schedule.scale_model_input(x_t)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.conditioning import Conditioning, drop_for_guidance
from ldm.diffusion.likelihood import hybrid_loss
from ldm.diffusion.objectives import diffusion_loss, offset_noise
from ldm.diffusion.schedules import build_schedule
from ldm.diffusion.variance import split_output
from ldm.errors import UsageError
from ldm.fastpath import AMBIENT, CANDIDATES, FastPath, check_precision, choose, denoiser_workload, train_step_probe
from ldm.io import ConfigError, PartError, config_from_dict, load_part, read_json, weights_hash
from ldm.lora import save_lora
from ldm.models.base import PartModule
from ldm.modules.denoiser import build_denoiser, check_compatible, conditioning_for, copy_denoiser
from ldm.modules.identity_vae import IdentityFirstStage, IdentityFirstStageConfig
from ldm.modules.lora import LoraSpec, add_lora
from ldm.modules.micro import SIZE_CONDITIONS, size_extras, wanted_conditions
from ldm.modules.null_text import UnconditionalText, UnconditionalTextConfig
from ldm.pipeline import PipelineConfig, TextToImagePipeline
from ldm.registry import denoiser_class
from ldm.visual import image_grid

LOSSES = ("simple", "hybrid")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
PARTS_KEY = "ldm_parts"  # checkpoint key: the weight hashes of the frozen parts the run trains with
INIT_KEY = "ldm_init_from"  # checkpoint key: the pipeline a fine-tuning started from (provenance)


def load_frozen_part(path: str | None, kind: str, what: str, make_target: str) -> nn.Module:
    """Load an exported part for conditioning; a missing path says which training to run first."""
    if not path:
        raise PartError(f"no {what} given: set model.init_args.{what}_path to an exported part ({make_target} first)")
    if not Path(path).is_dir():
        raise PartError(f"{what} part {path} does not exist: run `{make_target}` first (it exports the part there)")
    part = load_part(path, kind=kind)
    return part.requires_grad_(False).eval()


def sample_timesteps(batch: int, num_train_timesteps: int, stratified: bool, device: torch.device,
                     logit_normal: tuple[float, float] | None = None) -> torch.Tensor:
    """t ~ U{0..T−1}; ``stratified`` draws one t per equal-width stratum of the quantile u (same marginal, lower
    variance). ``logit_normal`` = (m, s): t = ⌊T·σ(m + s·n)⌋ with n ~ N(0, 1), i.e. t/T has the logit-normal density
    π_ln(x; m, s) = 1 / (s√(2π)) · 1 / (x(1−x)) · exp(−(logit(x) − m)² / (2s²)) (Esser et al. 2024, SD3, eq. 19):
    m > 0 trains the noisier steps, where the layout is decided, more often; n = Φ⁻¹(u) keeps the strata."""
    if stratified:
        u = (torch.arange(batch, device=device) + torch.rand(batch, device=device)) / batch
        u = u[torch.randperm(batch, device=device)]
    else:
        u = torch.rand(batch, device=device)
    if logit_normal is not None:
        mean, std = logit_normal
        n = math.sqrt(2.0) * torch.erfinv(2 * u.clamp(1e-6, 1 - 1e-6) - 1)
        u = torch.sigmoid(mean + std * n)
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def empty_prompt_conditioning(module: pl.LightningModule, text_encoder: nn.Module) -> Conditioning:
    """The "" prompt's conditioning (batch 1, on the module's device and dtype): the latent cache's when the run
    trains on one (``datamodule.empty_conditioning()``), else the text encoder's."""
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    empty = dm.empty_conditioning() if dm is not None and hasattr(dm, "empty_conditioning") else None
    if empty is None:
        empty = text_encoder.condition([""])
    return empty.trim().to(module.device, module.dtype)


@torch.no_grad()
def encode_batch(batch: dict[str, Any], vae: nn.Module, text_encoder: nn.Module, denoiser: nn.Module,
                 sample: bool = True) -> tuple[torch.Tensor, Conditioning]:
    """(z0 scaled latents, the denoiser's conditioning) from a cached batch (``latent_mean``/``latent_std``/``cond``)
    or an image batch (``image``/``caption``: both encoders run); ``sample``: a posterior draw, else its mean."""
    if "latent_mean" in batch:
        mean = batch["latent_mean"]
        z0 = mean + batch["latent_std"] * torch.randn_like(mean) if sample else mean
        cond = batch["cond"]
    else:
        image = batch["image"]
        z0 = vae.encode_latents(image, sample=sample)
        # under a Trainer's autocast the VAE hands back bf16: the latents (and the noise, x_t and timesteps made
        # from them) keep the images' precision, as a cache's would; autocast applies inside the networks alone
        z0 = z0.to(torch.promote_types(z0.dtype, image.dtype))
        cond = text_encoder.condition(batch["caption"])
    if denoiser.config.pooled_dim and cond.pooled is None:
        raise ValueError("this denoiser is conditioned on the pooled text embedding but the latent cache has none: "
                         "rebuild it with `ldm cache` (make train-ldm does)")
    cond = conditioning_for(denoiser, cond.trim())
    wanted = wanted_conditions(denoiser)
    if wanted:  # SDXL micro-conditioning from the batch's sizes and crops
        f = vae.config.downsample_factor
        target = (z0.shape[2] * f, z0.shape[3] * f)
        original = batch.get("original_size")
        if original is None:  # a cache or batch without sizes: as if uncropped at the target size
            original = torch.tensor([list(target)]).expand(z0.shape[0], 2)
        crop = batch.get("crop_coords")
        crop = torch.zeros(z0.shape[0], 2) if crop is None else crop
        extras = {k: v.to(z0.device) for k, v in size_extras(original, crop, target, wanted).items()}
        cond = dataclasses.replace(cond, extras={**cond.extras, **extras})
    return z0, cond


# denoiser fields a fine-tuning may set differently from the pipeline it starts from (training-only)
TRAINING_ONLY = ("gradient_checkpointing", "dropout")


class InitSource:
    """The pipeline a fine-tuning starts from (``init_from``): its denoiser spec and schedule, checked against
    what the training config states, and its weights (hash-verified) to load."""

    def __init__(self, path: str, denoiser: dict[str, Any] | None, noise_schedule: dict[str, Any] | None):
        from ldm.pipeline import DENOISER_DIR, PIPELINE_FILE

        self.path = Path(path)
        missing = [p for p in ("vae", "text_encoder", DENOISER_DIR, "scheduler", PIPELINE_FILE)
                   if not (self.path / p).exists()]
        if missing:
            raise UsageError(f"model.init_args.init_from {path}: not a pipeline folder (it lacks {missing}); give a "
                             "folder written by `ldm convert --from ...` or `ldm export`")
        config = read_json(self.path / DENOISER_DIR / "config.json")
        self.metadata = {k: v for k, v in config.items() if k.startswith("_")}
        recorded = {k: v for k, v in config.items() if not k.startswith("_")}
        given = dict(denoiser or {})
        kind = given.pop("type", None)
        source_class = config.get("_class_name")
        if kind is not None and denoiser_class(kind, "model.init_args.denoiser.type").__name__ != source_class:
            raise UsageError(f"model.init_args.denoiser.type {kind!r} differs from {path}'s {source_class}")
        self.denoiser_spec = {"type": config.get("_class_name"), **recorded,
                              **self._agreeing(given, recorded, "denoiser", f"{path}/{DENOISER_DIR}", TRAINING_ONLY)}
        schedule = {k: v for k, v in read_json(self.path / "scheduler" / "config.json").items()
                    if not k.startswith("_")}
        if noise_schedule:
            full = build_schedule(noise_schedule).to_config()
            self._agreeing({k: full[k] for k in noise_schedule}, schedule, "noise_schedule", f"{path}/scheduler", ())
        self.schedule = schedule
        self.pipeline_config = read_json(self.path / PIPELINE_FILE)

    @staticmethod
    def _agreeing(given: dict[str, Any], recorded: dict[str, Any], block: str, source: str,
                  free: tuple[str, ...]) -> dict[str, Any]:
        """The ``free`` fields of ``given``; any other field must equal the recorded one."""
        def same(a: Any, b: Any) -> bool:
            return json.loads(json.dumps(a)) == json.loads(json.dumps(b))

        differ = {k: v for k, v in given.items() if k not in free and not (k in recorded and same(v, recorded[k]))}
        if differ:
            raise UsageError(f"model.init_args.{block} {differ} differs from {source} "
                             f"({ {k: recorded.get(k) for k in differ} }): drop it, the fine-tuning starts from there")
        return {k: v for k, v in given.items() if k in free}

    def load_into(self, denoiser: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> dict[str, Any]:
        """Copy the source denoiser's weights into ``denoiser``; returns the ``_init_from`` provenance record."""
        from ldm.pipeline import DENOISER_DIR, check_trained_together

        part = load_part(self.path / DENOISER_DIR, kind="denoiser")
        check_trained_together(self.path, self.metadata.get("_trained_with"),
                               {"vae": weights_hash(vae), "text_encoder": weights_hash(text_encoder)})
        denoiser.load_state_dict(part.state_dict())
        record = {"path": str(self.path.resolve()), "denoiser_sha256": weights_hash(part)}
        if self.metadata.get("_init_from"):
            record["from"] = self.metadata["_init_from"]  # the source's own start: the whole lineage
        return record


class LatentDiffusion(PartModule):
    """The denoiser's LightningModule. Args are plain values so LightningCLI/YAML can set all of them.

    Args:
        vae_path / text_encoder_path: exported parts (``ldm export`` output).
        denoiser: ``{type: unet | dit, ...}``: the registered denoiser and its config fields; in/out channels,
            ``context_dim`` (and ``pooled_dim`` with ``pooled_conditioning``) default to the loaded parts', and
            ``input_size`` (a DiT's latent size) to ``resolution`` / the vae factor.
        noise_schedule: ``ScheduleConfig`` fields (name, num_train_timesteps, zero_terminal_snr, prediction_type...).
        optimizer / lr_schedule: the training base's blocks (AdamW; warm-up then cosine to ``min_lr_ratio``).
        loss_weighting / min_snr_gamma: "uniform" (L_simple) or "min_snr" (Hang et al. 2023).
        offset_noise: strength of per-channel offset noise (0 = off).
        p_uncond: caption dropout probability for classifier-free guidance.
        ema_decay: EMA of the denoiser weights, with warm-up min(decay, (1+n)/(10+n)); used for sampling/export.
        stratified_timesteps: stratified t sampling per batch.
        timestep_sampling / logit_mean / logit_std: "uniform" t, or "logit_normal": t/T logit-normal with this mean
            and standard deviation (SD3's timestep density; :func:`sample_timesteps`), L_simple only.
        resolution: image size (the denoiser runs at resolution / vae factor); default 32, or init_from's.
        val_prompts / sample_every_n_val / sample_steps / sample_guidance: the validation sample grid
            (``val_prompts`` None: the training dataset's own prompts, when its module has some).
        pooled_conditioning: also condition on the prompt's pooled embedding, added to the time embedding
            (GLIDE sec. 2.3, SDXL sec. 2.1).
        pixel_channels: train in pixel space: the identity first stage with 3 (RGB) or 1 (grayscale) channels
            instead of ``vae_path``.
        unconditional: one constant token instead of ``text_encoder_path`` (an unconditional model p(x)).
        learned_variance: the denoiser outputs 2C channels, the mean part and v of Σ_θ (iDDPM eq. 15).
        loss / vlb_weight: "simple" (L_simple, weighted by ``loss_weighting``) or "hybrid" (L_simple + λ L_vlb,
            iDDPM eq. 16, λ = ``vlb_weight``; needs ``learned_variance``). The L_0 term is the discretized
            8-bit decoder in pixel space and the Gaussian density on latents.
        init_from: a pipeline folder (``ldm convert`` import, or an ``ldm export``) to fine-tune: its VAE and
            text encoder replace ``vae_path``/``text_encoder_path``, its denoiser (config and weights) and noise
            schedule are the starting point (a ``denoiser``/``noise_schedule`` block may only repeat them, or set
            ``gradient_checkpointing``/``dropout``), ``resolution`` defaults to its image size, and the exported
            pipeline records ``_init_from`` (the source folder and its denoiser's sha256). The latent cache must be
            built with the pipeline's parts (``ldm cache --vae PIPELINE/vae --text-encoder PIPELINE/text_encoder``).
        size_conditioning: condition the denoiser on each image's original size, its crop's corner and the target
            size (SDXL's micro-conditioning, Podell et al. 2023 sec. 2.2-2.3): the denoiser's ``extra_conditions``
            default to ``ldm.modules.micro.SIZE_CONDITIONS``, fed from the batches' ``original_size``/``crop_coords``
            (image batches and latent caches both carry them); sampling uses the requested size and no crop.
        lora: ``{rank, alpha, target_modules, dropout}`` (``ldm.modules.lora.LoraSpec``): train LoRA adapters on the
            denoiser (usually with ``init_from``) instead of its weights; the export is then the adapter folder
            alone (``ldm.lora``: diffusers' LoRA layout), for ``ldm generate --lora`` and ``ldm lora merge``.
        precision: the denoiser's training precision and attention kernel (``ldm.fastpath``): "auto" measures
            fp32 against bf16 autocast on the first batch (once per machine, cached) and keeps bf16 only where it
            is faster; "fp32" / "bf16" fix it. Weights, gradients and optimizer state stay fp32; validation
            losses are computed in fp32; a Trainer ``precision`` other than 32 takes precedence.
    """

    default_optimizer = {"lr": 1e-3}
    default_lr_schedule = {"warmup_steps": 100, "decay": "cosine", "min_lr_ratio": 0.05}

    def __init__(self, vae_path: str | None = None, text_encoder_path: str | None = None,
                 denoiser: dict[str, Any] | None = None, noise_schedule: dict[str, Any] | None = None,
                 optimizer: dict[str, Any] | None = None, lr_schedule: dict[str, Any] | None = None,
                 loss_weighting: str = "uniform", min_snr_gamma: float = 5.0, offset_noise: float = 0.0,
                 p_uncond: float = 0.1, ema_decay: float = 0.999, stratified_timesteps: bool = True,
                 resolution: int | None = None, val_prompts: list[str] | None = None, sample_every_n_val: int = 1,
                 sample_steps: int = 10, sample_guidance: float = 4.0, val_timesteps: int = 8,
                 pooled_conditioning: bool = False, init_from: str | None = None,
                 pixel_channels: int | None = None, unconditional: bool = False,
                 learned_variance: bool = False, loss: str = "simple", vlb_weight: float = 0.001,
                 lora: dict[str, Any] | None = None, size_conditioning: bool = False,
                 precision: str = "auto", timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        super().__init__(optimizer, lr_schedule)
        check_precision(precision, "model.init_args.precision")
        self.save_hyperparameters()
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        if loss not in LOSSES:
            raise UsageError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise UsageError(f"model.init_args.timestep_sampling must be one of {list(TIMESTEP_SAMPLING)}, "
                             f"got {timestep_sampling!r}")
        if timestep_sampling != "uniform" and (loss != "simple" or logit_std <= 0):
            raise UsageError("timestep_sampling: logit_normal needs loss: simple (L_vlb's estimate assumes uniform t) "
                             f"and logit_std > 0 (got loss {loss!r}, logit_std {logit_std})")
        if (loss == "hybrid") != learned_variance:
            raise UsageError("loss: hybrid trains the learned variance and a learned variance needs its L_vlb term: "
                             "set both learned_variance: true and loss: hybrid, or neither")
        source = None
        if init_from:
            source = InitSource(init_from, denoiser, noise_schedule)
            for name, given in (("vae", vae_path), ("text_encoder", text_encoder_path)):
                if given and Path(given).resolve() != (source.path / name).resolve():
                    raise UsageError(f"model.init_args.{name}_path {given} and init_from {init_from} both name a "
                                     f"{name}: init_from brings its own, drop {name}_path")
            vae_path, text_encoder_path = str(source.path / "vae"), str(source.path / "text_encoder")
            denoiser, noise_schedule = source.denoiser_spec, source.schedule
            resolution = resolution or source.pipeline_config.get("height")
        self.hparams.resolution = resolution = resolution or 32
        if pixel_channels is not None:
            if vae_path:
                raise UsageError("give either vae_path or pixel_channels (pixel space), not both")
            self.vae = IdentityFirstStage(IdentityFirstStageConfig(in_channels=3, z_channels=pixel_channels)).eval()
        else:
            self.vae = load_frozen_part(vae_path, "vae", "vae", "make train-vae")
        if unconditional:
            if text_encoder_path:
                raise UsageError("give either text_encoder_path or unconditional: true, not both")
            width = int((denoiser or {}).get("context_dim") or 32)
            self.text_encoder = UnconditionalText(UnconditionalTextConfig(token_dim=width)).eval()
        else:
            self.text_encoder = load_frozen_part(text_encoder_path, "text_encoder", "text_encoder", "make train-clip")
        self.text_encoder.freeze()
        z, f = self.vae.config.z_channels, self.vae.config.downsample_factor
        if resolution % f:
            raise ConfigError(f"model.init_args.resolution={resolution} is not a multiple of the vae factor {f}")
        defaults = {"in_channels": z, "out_channels": 2 * z if learned_variance else z,
                    "context_dim": self.text_encoder.token_dim,
                    "pooled_dim": self.text_encoder.pooled_dim if pooled_conditioning else None,
                    "input_size": resolution // f}  # for denoisers of a fixed latent size (DiT)
        if size_conditioning:
            defaults["extra_conditions"] = dict(SIZE_CONDITIONS)
        self.denoiser = build_denoiser(denoiser or {}, defaults, "model.init_args.denoiser")
        if size_conditioning and not hasattr(self.denoiser.config, "extra_conditions"):
            raise ConfigError(f"model.init_args.size_conditioning: the {type(self.denoiser).__name__} denoiser takes "
                              "no size/crop conditions (extra_conditions); set size_conditioning false or use a unet")
        self.check_denoiser(resolution // f, learned_variance)
        self.schedule = build_schedule(noise_schedule)
        self.init_source: dict[str, Any] | None = None
        self._pipeline_defaults = PipelineConfig()
        if source is not None:
            self.init_source = source.load_into(self.denoiser, self.vae, self.text_encoder)
            self._pipeline_defaults = config_from_dict(PipelineConfig, source.pipeline_config,
                                                       f"{init_from}/pipeline.json")
        self.lora = LoraSpec(**lora) if lora else None
        if self.lora is not None:  # only the adapters train; the EMA below tracks them alone
            add_lora(self.denoiser, self.lora)
        self.track_ema(self.denoiser, ema_decay)
        self.val_prompts = None if val_prompts is None else list(val_prompts)
        self._empty: Conditioning | None = None
        self.fast: FastPath | None = None  # the training fast path, chosen on the first training batch

    def check_denoiser(self, latent_size: int, learned_variance: bool = False) -> None:
        """A denoiser block that cannot train on these parts' latents and text features is a config error."""
        cfg = self.denoiser.config
        problems = check_compatible(cfg, self.vae.config.z_channels, self.text_encoder.token_dim,
                                    self.text_encoder.pooled_dim, (latent_size, latent_size))
        expected = (2 if learned_variance else 1) * cfg.in_channels
        if cfg.out_channels != expected and learned_variance:
            problems.append(f"out_channels={cfg.out_channels} is not the learned-variance output ({expected}: mean and "
                            "variance per latent channel); leave out_channels out (it follows the vae)")
        elif cfg.out_channels != expected:
            problems.append(f"out_channels={cfg.out_channels} is a learned-variance output, which needs "
                            "learned_variance: true and loss: hybrid; leave out_channels out (it follows the vae)")
        if problems:
            raise ConfigError(f"model.init_args.denoiser: {'; '.join(problems)} (resolution "
                              f"{self.hparams.resolution}, vae factor {self.vae.config.downsample_factor}): "
                              "leave these fields out to take them from the parts")

    # ---- frozen parts stay out of checkpoints: they are exported parts with their own files ----------
    frozen_prefixes = ("vae.", "text_encoder.")

    def trainable_parameters(self):
        return ((n, p) for n, p in self.denoiser.named_parameters() if p.requires_grad)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[PARTS_KEY] = self.parts_provenance()
        if self.init_source is not None:
            checkpoint[INIT_KEY] = self.init_source

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        # checkpoints written before the denoiser protocol name the denoiser "unet"
        state_dict = {("denoiser." + k[5:] if k.startswith("unet.") else k): v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- provenance: a cache or a resumed run must come from the configured parts ---------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "check_parts"):
            dm.check_parts(self.vae, self.text_encoder)

    def parts_provenance(self) -> dict[str, str | None]:
        return {"vae": weights_hash(self.vae), "text_encoder": weights_hash(self.text_encoder)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(checkpoint.get(INIT_KEY), dict):  # where the run started, not where init_from points now
            self.init_source = checkpoint[INIT_KEY]
        recorded = checkpoint.get(PARTS_KEY) or {}
        for name, current in self.parts_provenance().items():
            if recorded.get(name) and current and recorded[name] != current:
                raise PartError(f"this checkpoint was trained with another {name} (sha256 {recorded[name][:12]}…) than "
                                f"model.{name}_path ({current[:12]}…): point {name}_path at the part it was trained "
                                "with, or start a new run")

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    # ---- conditioning ------------------------------------------------------------------------------
    def empty_conditioning(self) -> Conditioning:
        """The "" prompt's conditioning (batch 1), used for caption dropout: the cache's when training on one."""
        if self._empty is None or self._empty.tokens.device != self.device:
            self._empty = empty_prompt_conditioning(self, self.text_encoder)
        return conditioning_for(self.denoiser, self._empty)

    @torch.no_grad()
    def latents_and_conditioning(self, batch: dict[str, Any], sample: bool = True) -> tuple[torch.Tensor, Conditioning]:
        """(z0 scaled latents, conditioning) from a cached or an image batch (``sample``: a posterior draw,
        else its mean)."""
        z0, cond = encode_batch(batch, self.vae, self.text_encoder, self.denoiser, sample)
        return z0, cond.to(self.device, self.dtype)

    # ---- training ----------------------------------------------------------------------------------
    @property
    def decoder_kind(self) -> str:
        """The L_0 term's decoder: the discretized 8-bit one on pixels, the Gaussian density on latents."""
        return "discretized" if getattr(self.vae, "is_identity", False) else "gaussian"

    def loss(self, z0: torch.Tensor, cond: Conditioning, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Weighted denoising loss of the denoiser at timesteps ``t`` with ``noise`` (objectives.diffusion_loss),
        or the hybrid loss of a learned-variance denoiser (likelihood.hybrid_loss)."""
        x_t = self.schedule.q_sample(z0, t, noise)
        x_in, t_in = self.schedule.scale_model_input(x_t, t), t.to(z0.dtype)  # VE: c_in · x_t; VP: x_t
        # evaluation (validation, likelihoods) runs as its caller set it up: under the Trainer's precision, if any
        fast = self.training_fast_path(x_in, t_in, cond) if self.training and torch.is_grad_enabled() else AMBIENT
        with fast.context(x_t.device):
            out = self.denoiser(x_in, t_in, cond)
        h = self.hparams
        if h.loss == "hybrid":
            return hybrid_loss(out, z0, noise, t, self.schedule, prediction_type=self.schedule.prediction_type,
                               lam=h.vlb_weight, decoder=self.decoder_kind, weighting=h.loss_weighting,
                               gamma=h.min_snr_gamma)
        return diffusion_loss(split_output(out, z0.shape[1])[0], z0, noise, t, self.schedule,
                              self.schedule.prediction_type, h.loss_weighting, h.min_snr_gamma)

    def training_fast_path(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> FastPath:
        """The fast path of the training step, chosen on the first batch (rank 0 measures, the others follow)."""
        if self.fast is None:
            trainer = self._trainer
            if trainer is not None and str(trainer.precision) not in ("32", "32-true"):
                self.fast = AMBIENT  # the Trainer's own mixed precision is in force: leave its autocast on
            else:
                name = None
                if trainer is None or trainer.is_global_zero:
                    workload = denoiser_workload(self.denoiser, x_t, cond, "train")
                    probe = train_step_probe(self.denoiser, x_t, t, cond)
                    name = choose(self.hparams.precision, workload, probe, x_t.device, log=print).name
                if trainer is not None and trainer.world_size > 1:
                    name = trainer.strategy.broadcast(name, src=0)
                self.fast = next(c for c in CANDIDATES if c.name == name)
        return self.fast

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        z0, cond = self.latents_and_conditioning(batch)
        cond = drop_for_guidance(cond, self.empty_conditioning(), self.hparams.p_uncond)
        noise = offset_noise(z0, self.hparams.offset_noise) if self.hparams.offset_noise else torch.randn_like(z0)
        h = self.hparams
        logit_normal = (h.logit_mean, h.logit_std) if h.timestep_sampling == "logit_normal" else None
        t = sample_timesteps(z0.shape[0], self.schedule.num_train_timesteps, h.stratified_timesteps, z0.device,
                             logit_normal)
        loss = self.loss(z0, cond, t, noise)
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        return loss

    # ---- validation --------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss at ``val_timesteps`` fixed timesteps with noise seeded by the batch index (comparable across runs)."""
        gen = torch.Generator().manual_seed(1000 + batch_idx)
        z0, cond = self.latents_and_conditioning(batch, sample=False)
        T, n = self.schedule.num_train_timesteps, self.hparams.val_timesteps
        losses = []
        with self.ema_weights():
            for t_val in torch.linspace(0, T - 1, n).round().long().tolist():
                noise = torch.randn(z0.shape, generator=gen).to(z0)
                t = torch.full((z0.shape[0],), t_val, device=z0.device, dtype=torch.long)
                losses.append(self.loss(z0, cond, t, noise))
        loss = torch.stack(losses).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=z0.shape[0], sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.wants_samples():
            return
        if self.sharded:  # gathering the sharded weights is a collective: every rank builds the pipeline
            pipe = self.pipeline()
            if self.trainer.is_global_zero:
                self.log_samples(pipe)
        elif self.trainer.is_global_zero:
            self.log_samples()

    @torch.no_grad()
    def pipeline(self, use_ema: bool = True) -> TextToImagePipeline:
        """A TextToImagePipeline over this module's parts (a copy of the denoiser, with EMA weights by default)."""
        denoiser = copy_denoiser(self.denoiser).to(self.device, self.dtype)
        if use_ema and self.ema is not None:
            self.ema.copy_to(denoiser)
        res = self.hparams.resolution
        clip = self._pipeline_defaults.clip_denoised or self.decoder_kind == "discretized"  # pixels live in [-1, 1]
        config = dataclasses.replace(self._pipeline_defaults, height=res, width=res,
                                     guidance=self.hparams.sample_guidance, clip_denoised=clip)
        provenance = {"_init_from": self.init_source} if self.init_source else None
        return TextToImagePipeline(self.vae, self.text_encoder, denoiser, self.schedule, config, provenance)

    def log_samples(self, pipe: TextToImagePipeline | None = None) -> None:
        """Sample the validation prompts (EMA weights, cheap sampler) and log the grid (TensorBoard + PNG)."""
        prompts = self.sample_prompts()
        pipe = pipe or self.pipeline()
        images = pipe(prompts, steps=self.hparams.sample_steps, n_per_prompt=4, seed=0, progress=False)
        self.log_image("val/samples", image_grid(images, rows=len(prompts), scale=4, row_labels=prompts))
        # the pipeline's parts are shared with the training module: put them back in eval mode
        self.vae.eval()
        self.text_encoder.eval()

    # ---- export ------------------------------------------------------------------------------------
    def exporter(self, datamodule: Any = None) -> Callable[[Path], None]:
        """The pipeline folder: vae/, text_encoder/, unet/ (the denoiser, EMA weights), scheduler/, pipeline.json;
        with a ``lora`` block, the adapter folder alone (``ldm.lora``, EMA weights)."""
        pipe = self.pipeline(use_ema=True)
        res = self.hparams.resolution
        sizes = [list(s) for s in getattr(datamodule, "image_sizes", None) or [] if list(s) != [res, res]]
        pipe.config.sizes = sizes or None  # the buckets of a bucketed cache: generating at them does not warn
        if self.lora is not None:
            spec, start = self.lora, self.init_source or {}
            record = {"trained_from": start.get("path")} if start else {}
            return lambda out: save_lora(pipe.denoiser, out, spec, base_hash=start.get("denoiser_sha256"),
                                         record=record)
        image_encoder = (Path(self.hparams.text_encoder_path) / "image_encoder"
                         if self.hparams.text_encoder_path else None)

        def write(out: Path) -> None:
            pipe.save_pretrained(out)
            # the CLIP image tower travels along for FD-CLIP / CLIP score
            if image_encoder is not None and image_encoder.is_dir():
                shutil.copytree(image_encoder, out / "text_encoder" / "image_encoder", dirs_exist_ok=True)

        return write
