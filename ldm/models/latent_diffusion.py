"""LatentDiffusion: trains the cross-attention U-Net on the latents of a frozen VAE, conditioned on a frozen
text encoder (Rombach et al. 2022, eq. 3): L = E_{z=E(x), y, ε, t} w(t) ‖target(ε, z, t) − f_θ(z_t, t, τ(y))‖².

The VAE and text encoder are *exported parts* loaded from ``vae_path``/``text_encoder_path``; only the
U-Net trains. Batches come either as images + captions (``WebDataModule``; both encoders run in the step)
or from a latent cache (``LatentDataModule``; several times faster on CPU). Captions are dropped to ""
with probability ``p_uncond`` for classifier-free guidance (Ho & Salimans 2022). Validation logs the loss
at fixed timesteps with fixed noise, and a sample grid of ``val_prompts`` from the EMA weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.diffusion.objectives import diffusion_loss, offset_noise
from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig
from ldm.io import PartError, load_part
from ldm.models.base import PartModule, local_log_dir, rank_zero_write
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.ema import EMA
from ldm.modules.text_encoder import CLIPTextConditioner
from ldm.modules.unet import UNet, UNetConfig
from ldm.pipeline import PipelineConfig, TextToImagePipeline, image_grid
from ldm.training.budget import planned_steps, warmup_cosine

DEFAULT_VAL_PROMPTS = ["a large red circle on the left", "a small blue square in the top right",
                       "a green triangle at the bottom", "a yellow star in the centre"]


def load_frozen_part(path: str | None, cls: type[nn.Module], what: str, make_target: str) -> nn.Module:
    """Load an exported part for conditioning; a missing path says which training to run first."""
    if not path:
        raise PartError(f"no {what} given: set model.init_args.{what}_path to an exported part ({make_target} first)")
    if not Path(path).is_dir():
        raise PartError(f"{what} part {path} does not exist: run `{make_target}` first (it exports the part there)")
    part = load_part(path, cls)
    return part.requires_grad_(False).eval()


def sample_timesteps(batch: int, num_train_timesteps: int, stratified: bool, device: torch.device) -> torch.Tensor:
    """t ~ U{0..T−1}; ``stratified`` draws one t per equal-width stratum (same marginal, lower variance)."""
    if not stratified:
        return torch.randint(0, num_train_timesteps, (batch,), device=device)
    u = (torch.arange(batch, device=device) + torch.rand(batch, device=device)) / batch
    return (u * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)[torch.randperm(batch, device=device)]


class LatentDiffusion(PartModule):
    """The denoiser's LightningModule. Args are plain values so LightningCLI/YAML can set all of them.

    Args:
        vae_path / text_encoder_path: exported parts (``ldm export`` output).
        unet: ``UNetConfig`` fields; in/out channels and context_dim default to the loaded parts'.
        schedule: ``ScheduleConfig`` fields (name, num_train_timesteps, zero_terminal_snr, prediction_type...).
        loss_weighting / min_snr_gamma: "uniform" (L_simple) or "min_snr" (Hang et al. 2023).
        offset_noise: strength of per-channel offset noise (0 = off).
        p_uncond: caption dropout probability for classifier-free guidance.
        lr, weight_decay, betas, warmup_steps: AdamW with linear warm-up then cosine decay to ``min_lr_ratio``.
        ema_decay: EMA of the U-Net weights, with warm-up min(decay, (1+n)/(10+n)); used for sampling/export.
        stratified_timesteps: stratified t sampling per batch.
        resolution: image size (the U-Net runs at resolution / vae factor).
        val_prompts / sample_every_n_val / sample_steps / sample_guidance: the validation sample grid.
        pooled_conditioning: also condition on the prompt's pooled embedding, added to the time embedding
            (``UNetConfig.pooled_dim`` = the text encoder's; GLIDE sec. 2.3, SDXL sec. 2.1).
    """

    def __init__(self, vae_path: str | None = None, text_encoder_path: str | None = None,
                 unet: dict[str, Any] | None = None, schedule: dict[str, Any] | None = None,
                 loss_weighting: str = "uniform", min_snr_gamma: float = 5.0, offset_noise: float = 0.0,
                 p_uncond: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 100, min_lr_ratio: float = 0.05,
                 ema_decay: float = 0.999, stratified_timesteps: bool = True, resolution: int = 32,
                 val_prompts: list[str] | None = None, sample_every_n_val: int = 1, sample_steps: int = 10,
                 sample_guidance: float = 4.0, val_timesteps: int = 8, pooled_conditioning: bool = False):
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.vae = load_frozen_part(vae_path, AutoencoderKL, "vae", "make train-vae")
        self.text_encoder = load_frozen_part(text_encoder_path, CLIPTextConditioner, "text_encoder", "make train-clip")
        if hasattr(self.text_encoder, "freeze"):
            self.text_encoder.freeze()
        z = self.vae.config.z_channels
        unet_cfg = {"in_channels": z, "out_channels": z, "context_dim": self.text_encoder.token_dim,
                    **({"pooled_dim": self.text_encoder.pooled_dim} if pooled_conditioning else {}), **(unet or {})}
        self.unet = UNet(UNetConfig(**unet_cfg))
        self.schedule = DiscreteSchedule(ScheduleConfig(**(schedule or {})))
        self.ema = EMA(self.unet, ema_decay)
        self.val_prompts = list(val_prompts or DEFAULT_VAL_PROMPTS)
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None
        self._empty_pooled: torch.Tensor | None = None
        self._val_runs = 0

    # ---- frozen parts stay out of checkpoints: they are exported parts with their own files ----------
    _FROZEN = ("vae.", "text_encoder.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(self._FROZEN)}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        own = super().state_dict()
        merged = {**{k: v for k, v in own.items() if k.startswith(self._FROZEN)}, **state_dict}
        return super().load_state_dict(merged, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    # ---- conditioning ------------------------------------------------------------------------------
    def empty_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The "" prompt's (context (1, L, D), mask (1, L)) used for caption dropout."""
        if self._empty is None or self._empty[0].device != self.device:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if dm is not None and hasattr(dm, "empty_context"):
                ctx, mask = dm.empty_context()
            else:
                ctx, _, mask = self.text_encoder.encode_text([""], return_mask=True)
            keep = int(mask.sum())  # drop the padding columns (exact under masked cross-attention)
            self._empty = (ctx[:, :keep].to(self.device, self.dtype), mask[:, :keep].to(self.device))
        return self._empty

    def empty_pooled(self) -> torch.Tensor:
        """The "" prompt's pooled embedding (1, E), for caption dropout of a pooled-conditioned U-Net."""
        if self._empty_pooled is None or self._empty_pooled.device != self.device:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            pooled = dm.empty_pooled() if dm is not None and hasattr(dm, "empty_pooled") else None
            if pooled is None:
                pooled = self.text_encoder.encode_text([""])[1]
            self._empty_pooled = pooled.to(self.device, self.dtype)
        return self._empty_pooled

    @torch.no_grad()
    def pooled_text(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The captions' pooled embeddings (B, E) when the U-Net is conditioned on them, else None."""
        if not self.unet.config.pooled_dim:
            return None
        if "pooled" in batch:
            return batch["pooled"].to(self.dtype)
        if "latent_mean" in batch:
            raise ValueError("this U-Net is conditioned on the pooled text embedding but the latent cache has none: "
                             "rebuild it with `ldm cache` (make train-ldm does)")
        return self.text_encoder.encode_text(batch["caption"])[1].to(self.dtype)

    @torch.no_grad()
    def latents_and_context(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z0 scaled latents, context, mask) from a cached or an image batch."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
            z0 = mean + std * torch.randn_like(mean)
            return z0, batch["context"].to(self.dtype), batch["mask"]
        z0 = self.vae.encode_latents(batch["image"], sample=True)
        context, _, mask = self.text_encoder.encode_text(batch["caption"], return_mask=True)
        keep = int(mask.sum(1).max())
        return z0, context[:, :keep], mask[:, :keep]

    def drop_captions(self, context: torch.Tensor, mask: torch.Tensor, p: float, pooled: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace each caption's tokens (and pooled embedding) by the empty prompt's with probability ``p``
        (classifier-free guidance training, Ho & Salimans 2022 algorithm 1)."""
        if p <= 0:
            return context, mask, pooled
        empty_ctx, empty_mask = self.empty_context()
        length = max(context.shape[1], empty_ctx.shape[1])
        context, mask = pad_tokens(context, mask, length)
        empty_ctx, empty_mask = pad_tokens(empty_ctx, empty_mask, length)
        drop = torch.rand(context.shape[0], device=context.device) < p
        context = torch.where(drop[:, None, None], empty_ctx.to(context.dtype), context)
        mask = torch.where(drop[:, None], empty_mask, mask)
        if pooled is not None:
            pooled = torch.where(drop[:, None], self.empty_pooled().to(pooled.dtype), pooled)
        return context, mask, pooled

    # ---- training ----------------------------------------------------------------------------------
    def loss(self, z0: torch.Tensor, context: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted denoising loss of the U-Net at timesteps ``t`` with ``noise`` (objectives.diffusion_loss)."""
        x_t = self.schedule.q_sample(z0, t, noise)
        out = self.unet(x_t, t.to(z0.dtype), context, mask, pooled=pooled)
        h = self.hparams
        return diffusion_loss(out, z0, noise, t, self.schedule, self.schedule.prediction_type,
                              h.loss_weighting, h.min_snr_gamma)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        z0, context, mask = self.latents_and_context(batch)
        context, mask, pooled = self.drop_captions(context, mask, self.hparams.p_uncond, self.pooled_text(batch))
        noise = offset_noise(z0, self.hparams.offset_noise) if self.hparams.offset_noise else torch.randn_like(z0)
        t = sample_timesteps(z0.shape[0], self.schedule.num_train_timesteps, self.hparams.stratified_timesteps, z0.device)
        loss = self.loss(z0, context, mask, t, noise, pooled)
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.unet)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        opt = torch.optim.AdamW(self.unet.parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas),
                                fused=True)  # one kernel per step: ~2.5x faster than foreach on CPU
        trainer = self._trainer

        def factor(step: int) -> float:  # reads the live plan: FitToTimeBudget may shorten the run
            return warmup_cosine(step, h.warmup_steps, planned_steps(trainer), h.min_lr_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation --------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss at ``val_timesteps`` fixed timesteps with noise seeded by the batch index (comparable across runs)."""
        gen = torch.Generator().manual_seed(1000 + batch_idx)
        if "latent_mean" in batch:
            z0, context, mask = batch["latent_mean"], batch["context"].to(self.dtype), batch["mask"]
        else:
            z0 = self.vae.encode_latents(batch["image"])
            context, _, mask = self.text_encoder.encode_text(batch["caption"], return_mask=True)
        pooled = self.pooled_text(batch)
        T, n = self.schedule.num_train_timesteps, self.hparams.val_timesteps
        losses = []
        with self.ema.swapped_into(self.unet):
            for t_val in torch.linspace(0, T - 1, n).round().long().tolist():
                noise = torch.randn(z0.shape, generator=gen).to(z0)
                t = torch.full((z0.shape[0],), t_val, device=z0.device, dtype=torch.long)
                losses.append(self.loss(z0, context, mask, t, noise, pooled))
        loss = torch.stack(losses).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=z0.shape[0], sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        self._val_runs += 1
        every = self.hparams.sample_every_n_val
        if every and self._val_runs % every == 0 and self.trainer.is_global_zero and self.val_prompts:
            self.log_samples()

    @torch.no_grad()
    def pipeline(self, use_ema: bool = True) -> TextToImagePipeline:
        """A TextToImagePipeline over this module's parts (a copy of the U-Net with EMA weights by default)."""
        unet = UNet(self.unet.config).to(self.device, self.dtype)
        unet.load_state_dict(self.unet.state_dict())
        if use_ema:
            self.ema.copy_to(unet)
        res = self.hparams.resolution
        config = PipelineConfig(height=res, width=res, guidance=self.hparams.sample_guidance)
        return TextToImagePipeline(self.vae, self.text_encoder, unet, self.schedule, config)

    def log_samples(self) -> None:
        """Sample the validation prompts (EMA weights, cheap sampler) and log the grid as an image + PNG."""
        pipe = self.pipeline()
        images = pipe(self.val_prompts, steps=self.hparams.sample_steps, n_per_prompt=4, seed=0, progress=False)
        grid = image_grid(images, rows=len(self.val_prompts), scale=2)
        log_dir = local_log_dir(self.trainer)  # not trainer.log_dir: a collective, and only rank 0 is here
        (log_dir / "samples").mkdir(parents=True, exist_ok=True)
        grid.save(log_dir / "samples" / f"step_{self.global_step:06d}.png")
        for logger in self.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):
                import numpy as np

                exp.add_image("val/samples", np.asarray(grid), self.global_step, dataformats="HWC")
        # the pipeline's parts are shared with the training module: put them back in train mode where needed
        self.vae.eval()
        self.text_encoder.eval()
        del pipe

    # ---- export ------------------------------------------------------------------------------------
    def export(self, out_dir: str | Path, datamodule: Any = None) -> Path:
        """Write the pipeline folder (vae/, text_encoder/, unet/ with EMA weights, scheduler/, pipeline.json)."""
        pipe = self.pipeline(use_ema=True)
        image_encoder = Path(self.hparams.text_encoder_path or "") / "image_encoder"

        def write() -> None:
            pipe.save_pretrained(out_dir)
            if image_encoder.is_dir():  # the CLIP image tower travels along for FD-CLIP / CLIP score
                shutil.copytree(image_encoder, Path(out_dir) / "text_encoder" / "image_encoder", dirs_exist_ok=True)

        rank_zero_write(write)  # under DDP: rank 0 writes, the others wait
        return Path(out_dir)


def pad_tokens(context: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (B, L, D) tokens and (B, L) mask with zeros/False up to ``length``."""
    extra = length - context.shape[1]
    if extra <= 0:
        return context, mask
    context = torch.nn.functional.pad(context, (0, 0, 0, extra))
    mask = torch.nn.functional.pad(mask, (0, extra), value=False)
    return context, mask
