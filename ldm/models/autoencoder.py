"""Training the KL-VAE part: reconstruction NLL with a learned scale, KL, PatchGAN, and export.

The objective is Latent Diffusion's perceptual compression loss (Rombach et al. 2022, Sec. 3.1 and
appendix G, after Esser et al. 2021, eq. 4-7):

    L = sum_pixels(rec / exp(s) + s) / B  +  kl_weight * KL(q(z|x) || N(0, I))  +  lambda * L_GAN(D(x_hat))

with rec = l1 |x - x_hat| + l2 (x - x_hat)^2 (+ LPIPS), s a learned scalar log-variance (the NLL of a
Laplace/Gaussian-like likelihood with a learned scale), and lambda the adaptive weight of VQGAN
eq. 7 times ``disc_weight``, switched on after ``disc_start`` batches. Unlike the reference code,
``s`` is in the generator optimizer, so it is actually learned.

Two optimizers under Lightning manual optimization: the generator (encoder, decoder, quant convs,
logvar) and the discriminator, each with its own LR schedule. Note that Lightning's ``global_step``
(and so ``trainer.max_steps``) counts every optimizer step: one per batch before ``disc_start``, two
per batch after. Our own batch counter is the generator scheduler's step count, which a resumed
checkpoint restores. Under DDP use ``strategy: ddp_find_unused_parameters_true``: each optimizer's
step leaves the other network's parameters without gradients (and the discriminator is idle before
``disc_start``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.dist import all_reduce
from ldm.io import save_part
from ldm.models.base import PartModule
from ldm.modules.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ldm.modules.discriminator import (
    GAN_LOSSES,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
)
from ldm.visual import tensor_rows_grid


def latent_scale_and_shift(latents: Iterable[torch.Tensor], shift: bool = True) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1 / std, mean) over every element of the given latents; without
    ``shift``, (1 / rms, 0): unit second moment about zero, as Stable Diffusion's VAE (whose pipelines decode
    latents / scaling_factor, with no shift).

    Rombach et al. 2022 (Sec. 4.3.2) rescale KL-regularized latents to unit variance before diffusion;
    the shift (mean) follows the SD3/FLUX VAEs. Sums are accumulated in float64 and, under
    ``torch.distributed``, all-reduced, so every rank computes the same numbers (every rank must call
    this; there is no rank-0-only path).
    """
    stats = None
    for z in latents:
        z = z.detach().double()
        batch = torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), dtype=torch.float64,
                                                                     device=z.device)])
        stats = batch if stats is None else stats + batch
    if stats is None:
        raise ValueError("no latents to measure the scale on: the data loader produced no batches")
    total, total_sq, count = all_reduce(stats, "sum").tolist()
    mean = total / count if shift else 0.0
    var = max(total_sq / count - mean * mean, 0.0)
    if var <= 1e-24:
        raise ValueError(f"latents have zero variance over {int(count)} values; the encoder output is constant")
    return 1.0 / math.sqrt(var), mean


class AutoencoderModule(PartModule):
    default_optimizer = {"lr": 1e-4, "betas": (0.5, 0.9)}
    default_lr_schedule = {"decay": "constant"}

    """LightningModule training an :class:`~ldm.modules.autoencoder.AutoencoderKL` (see module docstring).

    Args:
        vae: AutoencoderKLConfig fields (geometry); missing keys take the kl-f8 defaults.
        optimizer, lr_schedule: the training base's blocks (``ldm.models.base``), for the generator and the
            discriminator (whose LR is ``disc_lr`` when set). Both count *batches*: the discriminator's
            schedule starts at ``disc_start``; ``decay_steps`` defaults to the batches implied by
            ``trainer.max_steps`` (which counts both optimizers' steps).
        l1_weight, l2_weight: per-pixel reconstruction terms.
        kl_weight: weight of the KL term (LDM: 1e-6).
        posterior_logvar_init: initial bias of quant_conv's log-variance channels (``None``: default init,
            posterior std ~1 at the start). A small initial std (e.g. -6: sigma ~0.05) keeps the
            reparameterization noise from drowning the untrained latents; the encoder still learns it.
        logvar_init, learn_logvar: the NLL's scalar log-variance.
        perceptual_weight, lpips_path: LPIPS term; needs a local weights file (nothing is downloaded).
        disc_start: batch at which the discriminator and the adversarial loss start (``None``: never).
        disc_weight, disc_loss, d_weight_max: GAN weight, "hinge" or "vanilla", clamp of the adaptive weight.
        discriminator: PatchDiscriminator arguments (``in_channels``, ``ndf``, ``n_layers``, ``norm``).
        disc_lr: discriminator learning rate (default ``lr``).
        grad_clip: max gradient norm for both optimizers (0 or None: no clipping).
        image_every_n_steps, num_images: reconstruction grid every N batches (0: never).
        export_batches: training batches used to measure the latent scale at export.
        latent_shift: also measure and store a latent mean (``shift_factor``); false: scale only (1/rms), what
            Stable Diffusion pipelines (diffusers, single files) can express.
    """

    def __init__(
        self,
        vae: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        lr_schedule: dict[str, Any] | None = None,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        kl_weight: float = 1e-6,
        posterior_logvar_init: float | None = None,
        logvar_init: float = 0.0,
        learn_logvar: bool = True,
        perceptual_weight: float = 0.0,
        lpips_path: str | None = None,
        disc_start: int | None = 50001,
        disc_weight: float = 0.5,
        disc_loss: str = "hinge",
        d_weight_max: float = 1e4,
        discriminator: dict[str, Any] | None = None,
        disc_lr: float | None = None,
        grad_clip: float | None = 1.0,
        image_every_n_steps: int = 500,
        num_images: int = 8,
        export_batches: int = 32,
        latent_shift: bool = True,
    ) -> None:
        super().__init__(optimizer, lr_schedule)
        self.save_hyperparameters()
        self.automatic_optimization = False
        if disc_loss not in GAN_LOSSES:
            raise ValueError(f"disc_loss must be one of {GAN_LOSSES}, got {disc_loss!r}")
        self.vae = AutoencoderKL(AutoencoderKLConfig(**(vae or {})))
        if posterior_logvar_init is not None and self.vae.config.double_z:
            with torch.no_grad():
                self.vae.quant_conv.bias[self.vae.config.z_channels:] = posterior_logvar_init
        self.discriminator = PatchDiscriminator(**{"in_channels": self.vae.config.out_channels,
                                                   **(discriminator or {})})
        if disc_start is None:  # never trained: frozen, so DDP does not wait for its gradients
            self.discriminator.requires_grad_(False)
        self.logvar = torch.nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.perceptual = None
        if perceptual_weight > 0:
            if not lpips_path:
                raise ValueError("perceptual_weight > 0 needs a local LPIPS weights file: set model.init_args."
                                 "lpips_path (nothing is downloaded), or perceptual_weight: 0 to train without it")
            from ldm.modules.lpips import LPIPS

            self.perceptual = LPIPS.from_file(lpips_path).eval().requires_grad_(False)
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    # ---- model API -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        return self.vae(x, sample_posterior=sample_posterior)

    def _images(self, batch: dict[str, Any] | torch.Tensor) -> torch.Tensor:
        x = batch["image"] if isinstance(batch, dict) else batch
        if not torch.is_tensor(x):
            raise ValueError("expected batch['image'] to be a float tensor (B, C, H, W) in [-1, 1]")
        return x

    # ---- losses ----------------------------------------------------------------------------------
    def reconstruction_terms(self, x: torch.Tensor, recon: torch.Tensor, posterior) -> dict[str, torch.Tensor]:
        """Per-pixel reconstruction loss, its NLL with the learned log-variance, and the KL (Rombach et al.
        2022, appendix G; Kingma & Welling 2014, appendix B). Sums are per image, averaged over the batch."""
        x, recon = x.float(), recon.float()
        diff = recon - x
        rec = self.hparams.l1_weight * diff.abs()
        if self.hparams.l2_weight:
            rec = rec + self.hparams.l2_weight * diff.pow(2)
        if self.perceptual is not None:
            rec = rec + self.hparams.perceptual_weight * self.perceptual(x, recon)
        nll = rec / torch.exp(self.logvar) + self.logvar
        b = x.shape[0]
        return {"rec_loss": rec.mean(), "nll_loss": nll.sum() / b, "kl_loss": posterior.kl().float().sum() / b,
                "mse": diff.pow(2).mean(), "posterior_std": posterior.std.float().mean()}

    def gan_on(self, batches: int) -> bool:
        start = self.hparams.disc_start
        return start is not None and batches >= start

    # ---- training ----------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        x = self._images(batch)
        opt_g, opt_d = self.optimizers()
        sch_g, sch_d = self.lr_schedulers()
        step = sch_g.last_epoch  # batches trained so far (restored on resume)
        use_gan = self.gan_on(step)
        clip = self.hparams.grad_clip or 0.0

        # generator: encoder, decoder, quant convs and logvar
        with self.toggled_optimizer(opt_g):
            recon, posterior = self.vae(x, sample_posterior=True)
            terms = self.reconstruction_terms(x, recon, posterior)
            loss = terms["nll_loss"] + self.hparams.kl_weight * terms["kl_loss"]
            if use_gan:
                g_loss = generator_loss(self.discriminator(recon.contiguous()).float(), self.hparams.disc_loss)
                d_weight = self.hparams.disc_weight * adaptive_weight(
                    terms["nll_loss"], g_loss, self.vae.last_layer, self.hparams.d_weight_max)
                loss = loss + d_weight * g_loss
                terms.update(g_loss=g_loss, d_weight=d_weight)
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            if clip > 0:
                self.clip_gradients(opt_g, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            opt_g.step()
        sch_g.step()

        # discriminator: real vs detached reconstructions
        if use_gan:
            with self.toggled_optimizer(opt_d):
                logits_real = self.discriminator(x.contiguous().detach()).float()
                logits_fake = self.discriminator(recon.contiguous().detach()).float()
                d_loss = discriminator_loss(logits_real, logits_fake, self.hparams.disc_loss)
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                if clip > 0:
                    self.clip_gradients(opt_d, gradient_clip_val=clip, gradient_clip_algorithm="norm")
                opt_d.step()
            sch_d.step()
            terms.update(d_loss=d_loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())

        terms.update(loss=loss, logvar=self.logvar)
        self.log_dict({f"train/{k}": v.detach().float() for k, v in terms.items()})
        self.log("train/disc_active", float(use_gan))
        every = self.hparams.image_every_n_steps
        if every and step % every == 0 and self.global_rank == 0:
            self.log_images("train/reconstructions", [x, recon], step)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self._images(batch)
        recon, posterior = self.vae(x, sample_posterior=False)
        terms = self.reconstruction_terms(x, recon, posterior)
        terms["loss"] = terms["rec_loss"]  # what the checkpoint callback's `val/loss` ranks by
        b = x.shape[0]
        self.log_dict({f"val/{k}": v.detach() for k, v in terms.items()}, sync_dist=True, batch_size=b)
        x01, r01 = (x.float() + 1) / 2, ((recon.float() + 1) / 2).clamp(0, 1)
        self.val_psnr(r01, x01)
        self.val_ssim(r01, x01)
        self.log("val/psnr", self.val_psnr, batch_size=b, prog_bar=True)
        self.log("val/ssim", self.val_ssim, batch_size=b)
        if batch_idx == 0 and self.global_rank == 0:
            self.log_images("val/reconstructions", [x, recon], self._batches_done())

    def _batches_done(self) -> int:
        if self._trainer is None or not self.trainer.lr_scheduler_configs:
            return 0
        return int(self.trainer.lr_scheduler_configs[0].scheduler.last_epoch)

    def log_images(self, tag: str, rows: list[torch.Tensor], step: int) -> None:
        """Inputs over reconstructions, through the training base's image logger."""
        self.log_image(tag, tensor_rows_grid(rows, self.hparams.num_images), step)

    # ---- optimizers --------------------------------------------------------------------------------
    def planned_steps(self) -> float:
        """Batches in the run, derived from ``trainer.max_steps``, which under manual optimization counts the
        discriminator's steps too (two per batch after ``disc_start``)."""
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps is None or max_steps <= 0:
            return super().planned_steps()
        start = self.hparams.disc_start
        if start is None or start >= max_steps:
            return float(max_steps)
        return float(start + math.ceil((max_steps - start) / 2))

    def configure_optimizers(self):
        cfg = self.lr_schedule_config
        if cfg.decay == "cosine" and not cfg.decay_steps and not math.isfinite(self.planned_steps()):
            raise ValueError("lr_schedule.decay cosine needs lr_schedule.decay_steps or trainer.max_steps > 0")
        generator = [(n, p) for n, p in self.vae.named_parameters() if p.requires_grad]
        if self.logvar.requires_grad:
            generator.append(("logvar", self.logvar))
        opt_g = self.make_optimizer(generator)
        opt_d = self.make_optimizer(self.discriminator.named_parameters(), lr=self.hparams.disc_lr)
        sch_g = self.make_scheduler(opt_g)
        sch_d = self.make_scheduler(opt_d, offset=self.hparams.disc_start or 0)
        return ([opt_g, opt_d], [{"scheduler": sch_g, "interval": "step", "name": "lr/vae"},
                                 {"scheduler": sch_d, "interval": "step", "name": "lr/disc"}])

    # ---- export ------------------------------------------------------------------------------------
    @torch.no_grad()
    def measure_latent_scale(self, batches: Iterable[Any], num_batches: int) -> tuple[float, float]:
        """(scaling_factor, shift_factor) over the posterior *means* of the first ``num_batches`` batches
        (the mode, so the result does not depend on any RNG); identical on every rank."""
        was_training = self.vae.training
        self.vae.eval()
        device = next(self.vae.parameters()).device

        def latents():
            for i, batch in enumerate(batches):
                if i >= num_batches:
                    break
                yield self.vae.encode(self._images(batch).to(device)).mode()

        try:
            return latent_scale_and_shift(latents(), self.hparams.latent_shift)
        finally:
            self.vae.train(was_training)

    def exporter(self, datamodule: pl.LightningDataModule | None) -> Callable[[Path], None]:
        """Measure the latent scale/shift on training batches (every rank), then write the VAE part."""
        if datamodule is None:
            raise ValueError("exporting the VAE measures its latent scale on training data: pass the datamodule "
                             "(ldm export reads it from the checkpoint; use --data-dir to point at the shards)")
        scale, shift = self.measure_latent_scale(export_dataloader(datamodule), self.hparams.export_batches)
        part = AutoencoderKL(dataclasses.replace(self.vae.config, scaling_factor=scale, shift_factor=shift))
        part.load_state_dict(self.vae.state_dict())
        return lambda out: save_part(part, out)


def export_dataloader(datamodule: pl.LightningDataModule) -> Iterable[Any]:
    """The training batches used to measure the latent scale.

    A fresh ``train_dataloader()``: for ``WebDataModule`` its shard order and shuffle buffer are seeded
    (seed, epoch 0, rank, worker), so the batches are the same on every export of the same run.
    """
    if getattr(datamodule, "trainer", None) is None:
        datamodule.setup("fit")
    return datamodule.train_dataloader()
