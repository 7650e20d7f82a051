"""Latent Consistency Distillation (LCD; Luo et al. 2023, "Latent Consistency Models", Algorithm 1) of a trained
pipeline into a few-step consistency model, as a LightningModule on the shared training base.

One step, for latents z (from the teacher's VAE or a latent cache) and their conditioning c:

1. t_{n+k} uniform on the skipping grid {k−1, 2k−1, ..., T−1}, t_n = max(t_{n+k} − k, 0) (sec. 4.3),
   x = α z + σ ε, and a guidance scale w ~ U[w_min, w_max] per sample (sec. 4.2);
2. the teacher's guided output u + w (c − u) at (x, t_{n+k}) (one batched forward of 2B) and one DDIM step
   to x̂_{t_n} (the skipping-step ODE solver, ``ldm.diffusion.consistency.ddim_solver_step``);
3. loss = d(f_θ(x, t_{n+k}, w, c), f_θ⁻(x̂_{t_n}, t_n, w, c)), with f the consistency function (boundary
   scalings, f(x, 0) = x), d the pseudo-Huber metric (Song & Dhariwal 2023) and θ⁻ the target network, an EMA
   of the student (μ = ``target_ema_decay``, updated after every optimizer step; 0 = the student itself).

Two students: the full one (the teacher's U-Net plus a zero-initialised guidance-scale embedding, w-conditioning
of Meng et al. 2023: it takes w as an input and samples without a CFG batch), exported as a pipeline folder; or,
with a ``lora`` block, **LCM-LoRA** (Luo et al. 2023b): only LoRA adapters on the teacher train, no w input (the
guidance is baked in; sample with guidance 1), exported as an adapter folder that applies to the teacher
(``ldm generate --lora``, ``ldm lora merge``).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.conditioning import Conditioning
from ldm.diffusion.consistency import (
    consistency_function,
    ddim_solver_step,
    default_huber_c,
    pseudo_huber,
    skipping_grid,
    solver_end,
)
from ldm.diffusion.guidance import guided_output, takes_guidance_scale, with_guidance_scale
from ldm.errors import UsageError
from ldm.io import PartError, weights_hash
from ldm.lora import save_lora
from ldm.models.base import PartModule
from ldm.models.latent_diffusion import empty_prompt_conditioning, encode_batch
from ldm.modules.denoiser import conditioning_for, copy_denoiser, derive_denoiser
from ldm.modules.lora import LoraSpec, add_lora
from ldm.pipeline import TextToImagePipeline
from ldm.visual import image_grid

TEACHER_KEY = "ldm_teacher"  # checkpoint key: the sha256 of the teacher's weights


def load_teacher(path: str) -> TextToImagePipeline:
    """The teacher pipeline (``TextToImagePipeline.from_pretrained``, frozen); a folder that is not one is a user
    error naming ``model.init_args.teacher``."""
    if not isinstance(path, str) or not path:
        raise UsageError("model.init_args.teacher: give the teacher's pipeline folder")
    try:
        pipe = TextToImagePipeline.from_pretrained(path)
    except PartError as e:
        raise PartError(f"model.init_args.teacher: {path} is not a usable pipeline folder ({e})") from e
    if takes_guidance_scale(pipe.denoiser):
        raise UsageError(f"model.init_args.teacher: {path} is already w-conditioned (a distilled student?); "
                         "distil a diffusion model's pipeline")
    return pipe


class LatentConsistencyDistillation(PartModule):
    """LCD of the pipeline at ``teacher`` (see the module docstring). Args are plain values for LightningCLI.

    Args:
        teacher: a pipeline folder (``ldm export`` of an LDM run, or ``make demo``'s).
        lora: ``{rank, alpha, target_modules, dropout}``: train an LCM-LoRA instead of the full student.
        guidance_embed_dim: width of the full student's guidance-scale embedding (LCM's models: 256).
        w_min / w_max: range of the CFG scale w (standard form: 1 = no guidance) the teacher is distilled at.
        skip: the skipping step k (teacher timesteps per solver step; T/k grid points).
        sigma_data / timestep_scaling: boundary scalings c_skip, c_out (must match the sampler's: 0.5 and 10).
        huber_c: pseudo-Huber c (None: 0.00054 √d for d latent elements).
        target_ema_decay: μ of the target network θ⁻ (LCM: 0.95).
        ema_decay: an EMA of the student for export and sampling (None: the student's own weights).
        sample_steps / sample_guidance / val_prompts / sample_every_n_val: the validation sample grid
            (``lcm`` sampler; the LoRA student samples at guidance 1).
        val_batches_seed: validation draws t, w and noise from this seed per batch (comparable across runs).
    """

    default_optimizer = {"lr": 1e-4}
    default_lr_schedule = {"warmup_steps": 0, "decay": "constant"}

    def __init__(self, teacher: str, lora: dict[str, Any] | None = None, guidance_embed_dim: int = 256,
                 w_min: float = 2.0, w_max: float = 8.0, skip: int = 20, sigma_data: float = 0.5,
                 timestep_scaling: float = 10.0, huber_c: float | None = None, target_ema_decay: float = 0.95,
                 ema_decay: float | None = None, optimizer: dict[str, Any] | None = None,
                 lr_schedule: dict[str, Any] | None = None, sample_steps: int = 4, sample_guidance: float = 4.0,
                 val_prompts: list[str] | None = None, sample_every_n_val: int = 1, val_batches_seed: int = 1000):
        super().__init__(optimizer, lr_schedule)
        self.save_hyperparameters()
        if not 1.0 <= w_min <= w_max:
            raise UsageError(f"model.init_args: need 1 <= w_min <= w_max (standard CFG scales), got {w_min}, {w_max}")
        if not 0.0 <= target_ema_decay < 1.0:
            raise UsageError(f"model.init_args.target_ema_decay must be in [0, 1), got {target_ema_decay}")
        pipe = load_teacher(teacher)
        self.vae, self.text_encoder, self.schedule = pipe.vae, pipe.text_encoder, pipe.schedule
        self.text_encoder.freeze()
        self.teacher_config, self.teacher_hash = pipe.config, weights_hash(pipe.denoiser)
        self.teacher = pipe.denoiser.requires_grad_(False).eval()
        self.grid = skipping_grid(self.schedule.num_train_timesteps, skip)
        self.lora = LoraSpec(**lora) if lora else None
        if self.lora is not None:
            student = add_lora(copy_denoiser(self.teacher), self.lora)
        else:
            student = derive_denoiser(self.teacher, {"guidance_embed_dim": guidance_embed_dim},
                                      "model.init_args.guidance_embed_dim").requires_grad_(True)
        self.denoiser = student
        self.target = copy_denoiser(student).requires_grad_(False).eval()
        self.track_ema(self.denoiser, ema_decay)
        self.val_prompts = None if val_prompts is None else list(val_prompts)
        self._empty: Conditioning | None = None

    # ---- frozen parts (and the teacher) stay out of checkpoints ------------------------------------
    frozen_prefixes = ("vae.", "text_encoder.", "teacher.")

    @property
    def w_conditioned(self) -> bool:
        """Whether the student takes the guidance scale as an input (the full student; not LCM-LoRA)."""
        return self.lora is None

    def trainable_parameters(self):
        return ((n, p) for n, p in self.denoiser.named_parameters() if p.requires_grad)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[TEACHER_KEY] = self.teacher_hash

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get(TEACHER_KEY)
        if recorded and self.teacher_hash and recorded != self.teacher_hash:
            raise PartError(f"this checkpoint distils another teacher (sha256 {recorded[:12]}…) than "
                            f"model.teacher ({self.teacher_hash[:12]}…): point teacher at the pipeline it was run with")

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "check_parts"):
            dm.check_parts(self.vae, self.text_encoder)

    def train(self, mode: bool = True) -> LatentConsistencyDistillation:
        super().train(mode)
        for frozen in (self.vae, self.text_encoder, self.teacher, self.target):
            frozen.eval()
        return self

    # ---- the LCD loss --------------------------------------------------------------------------------
    def empty_conditioning(self) -> Conditioning:
        """The "" prompt's conditioning (batch 1): the teacher's unconditional branch."""
        if self._empty is None or self._empty.tokens.device != self.device:
            self._empty = empty_prompt_conditioning(self, self.text_encoder)
        return conditioning_for(self.teacher, self._empty)

    def student_conditioning(self, cond: Conditioning, w: torch.Tensor) -> Conditioning:
        """``cond`` with the guidance scales as an input for a w-conditioned student, else ``cond``."""
        return with_guidance_scale(cond, w) if self.w_conditioned else cond

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cond: Conditioning,
                     w: torch.Tensor) -> torch.Tensor:
        """The skipping-step solver: one DDIM step of the guided teacher (u + w (c − u), one forward of 2B)."""
        b = x.shape[0]
        both = Conditioning.cat([self.empty_conditioning().expand(b), cond])
        out_u, out_c = self.teacher(torch.cat([x, x]), torch.cat([t, t]).to(x.dtype), both).chunk(2)
        guided = guided_output(out_u, out_c, w.view(-1, *([1] * (x.ndim - 1))).to(x.dtype))
        return ddim_solver_step(guided, x, t, t_next, self.schedule, self.schedule.prediction_type)

    def consistency(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """f(x, t) of ``model`` (the student or the target) with the boundary scalings."""
        h = self.hparams
        return consistency_function(model(x, t.to(x.dtype), cond), x, t, self.schedule, self.schedule.prediction_type,
                                    h.sigma_data, h.timestep_scaling)

    def lcd_loss(self, z0: torch.Tensor, cond: Conditioning, index: torch.Tensor, noise: torch.Tensor,
                 w: torch.Tensor) -> torch.Tensor:
        """Mean pseudo-Huber distance between the student at (x_{t_{n+k}}, t_{n+k}) and the target network at the
        teacher's solver step (x̂_{t_n}, t_n), for grid indices ``index``, ``noise`` and guidance scales ``w``."""
        t = self.grid.to(z0.device)[index]
        t_next = solver_end(t, self.hparams.skip)
        x = self.schedule.q_sample(z0, t, noise)
        student_cond = self.student_conditioning(cond, w)
        x_next = self.teacher_step(x, t, t_next, cond, w)
        with torch.no_grad():
            target = self.consistency(self.target, x_next, t_next, student_cond)
        prediction = self.consistency(self.denoiser, x, t, student_cond)
        c = self.hparams.huber_c if self.hparams.huber_c is not None else default_huber_c(z0.shape[1:])
        return pseudo_huber(prediction, target, c).mean()

    def draw(self, batch: int, device: torch.device, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid indices (uniform over the T/k solver steps) and guidance scales w ~ U[w_min, w_max]."""
        h = self.hparams
        index = torch.randint(0, len(self.grid), (batch,), generator=generator).to(device)
        w = h.w_min + (h.w_max - h.w_min) * torch.rand(batch, generator=generator).to(device)
        return index, w

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        z0, cond = encode_batch(batch, self.vae, self.text_encoder, self.teacher)
        cond = cond.to(self.device, self.dtype)
        index, w = self.draw(z0.shape[0], z0.device)
        loss = self.lcd_loss(z0, cond, index, torch.randn_like(z0), w)
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_target()

    @torch.no_grad()
    def update_target(self) -> None:
        """θ⁻ ← μ θ⁻ + (1 − μ) θ over the trained weights (LCM Algorithm 1, last line)."""
        student = dict(self.denoiser.named_parameters())
        pairs = [(p, student[n]) for n, p in self.target.named_parameters() if student[n].requires_grad]
        torch._foreach_lerp_([p for p, _ in pairs], [s.detach() for _, s in pairs], 1.0 - self.hparams.target_ema_decay)

    # ---- validation ----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The LCD loss with t, w and noise drawn from a seed per batch (comparable across runs)."""
        gen = torch.Generator().manual_seed(self.hparams.val_batches_seed + batch_idx)
        z0, cond = encode_batch(batch, self.vae, self.text_encoder, self.teacher, sample=False)
        cond = cond.to(self.device, self.dtype)
        index, w = self.draw(z0.shape[0], z0.device, gen)
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        with self.ema_weights():
            loss = self.lcd_loss(z0, cond, index, noise, w)
        self.log("val/loss", loss, prog_bar=True, batch_size=z0.shape[0], sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.wants_samples() and self.trainer.is_global_zero:
            prompts = self.sample_prompts()
            images = self.pipeline()(prompts, n_per_prompt=4, seed=0, progress=False)
            self.log_image("val/samples", image_grid(images, rows=len(prompts), scale=2))
            for frozen in (self.vae, self.text_encoder):
                frozen.eval()

    # ---- export ----------------------------------------------------------------------------------------
    def sampling_defaults(self) -> dict[str, Any]:
        """What the student samples with: the lcm sampler, ``sample_steps``, and the guidance it takes as an input
        (the full student) or 1 (LCM-LoRA: guidance is baked in, no CFG batch)."""
        guidance = self.hparams.sample_guidance if self.w_conditioned else 1.0
        return {"sampler": "lcm", "steps": self.hparams.sample_steps, "guidance": guidance, "consistency_model": True}

    @torch.no_grad()
    def pipeline(self, use_ema: bool = True) -> TextToImagePipeline:
        """The student as a pipeline (a copy of its weights; EMA weights with ``ema_decay``)."""
        denoiser = copy_denoiser(self.denoiser).to(self.device, self.dtype)
        if use_ema and self.ema is not None:
            self.ema.copy_to(denoiser)
        c = self.teacher_config
        config = dataclasses.replace(c, guidance_rescale=0.0, **self.sampling_defaults())
        provenance = {"_distilled_from": {"path": str(Path(self.hparams.teacher).resolve()),
                                          "denoiser_sha256": self.teacher_hash}}
        return TextToImagePipeline(self.vae, self.text_encoder, denoiser, self.schedule, config, provenance)

    def exporter(self, datamodule: Any = None) -> Callable[[Path], None]:
        """The full student: a pipeline folder (unet/ is the w-conditioned student). LCM-LoRA: the adapter folder
        alone, whose record carries the sampling defaults (``ldm.lora``)."""
        pipe = self.pipeline(use_ema=True)
        if self.lora is None:
            image_encoder = Path(self.hparams.teacher) / "text_encoder" / "image_encoder"

            def write(out: Path) -> None:
                pipe.save_pretrained(out)
                if image_encoder.is_dir():  # the CLIP image tower travels along for FD-CLIP / CLIP score
                    shutil.copytree(image_encoder, out / "text_encoder" / "image_encoder", dirs_exist_ok=True)

            return write
        record = {"trained_from": self.hparams.teacher, "distilled": "lcm", "sampling": self.sampling_defaults()}
        spec, base = self.lora, self.teacher_hash
        return lambda out: save_lora(pipe.denoiser, out, spec, base_hash=base, record=record)
