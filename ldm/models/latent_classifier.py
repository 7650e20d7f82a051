"""LatentClassifierModule: trains the noisy-latent classifier of classifier guidance on a latent cache.

Dhariwal & Nichol 2021, §4.1: a classifier p_φ(y | x_t, t) trained with cross-entropy on samples of the forward
process x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4) at t ~ U{0..T−1}, with the same noise schedule the denoiser it
will guide was trained with. Here x_0 is a VAE latent drawn from the cached posterior (z = μ + σ·ε, as the denoiser
trains) and y are the labels the cache holds (``ldm cache --labels``, defaults from the dataset: shapes'
attributes). The loss is the sum over label heads of the mean cross-entropy over the samples that have that label
(−1 = unknown is left out).

The label vocabularies, latent shape and the VAE's weight hash are read from the cache when training starts
(``configure_model``) and kept in the hyper-parameters, so a checkpoint rebuilds the same network; the export is a
part (``LatentClassifier``, kind "classifier") that records the VAE it was trained on and its noise schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig
from ldm.io import PartError, config_from_dict, save_part
from ldm.models.base import PartModule
from ldm.modules.latent_classifier import LatentClassifier, LatentClassifierConfig


def labelled_cross_entropy(logits: dict[str, torch.Tensor], labels: torch.Tensor
                           ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Σ_a mean CE over the samples labelled for head a (column a of ``labels``, −1 = unknown), and per-head
    (correct, count) for accuracy. A head with no labelled sample in the batch adds 0."""
    total = labels.new_zeros((), dtype=torch.float32)
    stats = {}
    for a, (name, out) in enumerate(logits.items()):
        y = labels[:, a]
        known = y >= 0
        n = int(known.sum())
        if n:
            total = total + F.cross_entropy(out[known].float(), y[known])
        stats[name] = (int((out.argmax(1)[known] == y[known]).sum()), n)
    return total, stats


class LatentClassifierModule(PartModule):
    """Args (plain values for LightningCLI):

    classifier: ``LatentClassifierConfig`` fields (width, channel_mult, ...); ``in_channels``, ``resolution`` and
        ``labels`` are filled from the cache when left out.
    noise_schedule: the denoiser's ``ScheduleConfig`` (the classifier must see the z_t it will guide).
    vae_sha256: the cache's VAE (filled from the cache; recorded in the export).
    val_timesteps: validation measures loss and accuracy at this many evenly spaced t with seeded noise.
    """

    default_optimizer = {"lr": 1e-3, "weight_decay": 0.01}
    default_lr_schedule = {"warmup_steps": 50, "decay": "cosine", "min_lr_ratio": 0.05}

    def __init__(self, classifier: dict[str, Any] | None = None, noise_schedule: dict[str, Any] | None = None,
                 optimizer: dict[str, Any] | None = None, lr_schedule: dict[str, Any] | None = None,
                 vae_sha256: str | None = None, val_timesteps: int = 4):
        super().__init__(optimizer, lr_schedule)
        self.save_hyperparameters()
        self.schedule = DiscreteSchedule(ScheduleConfig(**(noise_schedule or {})))
        self.classifier: LatentClassifier | None = None
        if classifier and classifier.get("labels"):
            self._build(classifier)

    def _build(self, spec: dict[str, Any]) -> None:
        self.classifier = LatentClassifier(config_from_dict(LatentClassifierConfig, spec, "model.init_args.classifier"))

    def configure_model(self) -> None:
        """Build the network from the cache the run trains on (labels, latent shape), once."""
        if self.classifier is not None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        classes = getattr(dm, "label_classes", None)
        if not classes:
            raise PartError(f"the latent cache {getattr(dm, 'cache_dir', '?')} holds no labels: rebuild it with "
                            "`ldm cache ... --labels NAME=PATH,...` (shapes caches get the attributes by default)")
        dm.setup("fit")
        _, c, h, _ = dm.train_set.mean.shape
        spec = {"in_channels": c, "resolution": h, **(self.hparams.classifier or {}), "labels": classes}
        self.hparams.classifier = spec
        self.hparams.vae_sha256 = (dm.info.get("parts") or {}).get("vae")
        self._build(spec)

    def trainable_parameters(self):
        return self.classifier.named_parameters()

    def _step(self, batch: dict[str, Any], t: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, dict[str, Any]]:
        mean = batch["latent_mean"]
        draw = (lambda like: torch.randn(like.shape, generator=generator).to(like)) if generator else torch.randn_like
        z0 = mean + batch["latent_std"] * draw(mean)
        z_t = self.schedule.q_sample(z0, t, draw(mean))
        return labelled_cross_entropy(self.classifier(z_t, t.to(z0.dtype)), batch["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        from ldm.models.latent_diffusion import sample_timesteps

        b = batch["latent_mean"].shape[0]
        t = sample_timesteps(b, self.schedule.num_train_timesteps, True, batch["latent_mean"].device)
        loss, _ = self._step(batch, t)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss and per-label accuracy at ``val_timesteps`` fixed t, noise seeded by the batch index."""
        gen = torch.Generator().manual_seed(1000 + batch_idx)
        b, T = batch["latent_mean"].shape[0], self.schedule.num_train_timesteps
        losses, correct = [], {}
        for t_val in torch.linspace(0, T - 1, self.hparams.val_timesteps).round().long().tolist():
            t = torch.full((b,), t_val, device=batch["latent_mean"].device, dtype=torch.long)
            loss, stats = self._step(batch, t, gen)
            losses.append(loss)
            for name, (c, n) in stats.items():
                c0, n0 = correct.get(name, (0, 0))
                correct[name] = (c0 + c, n0 + n)
        loss = torch.stack(losses).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        for name, (c, n) in correct.items():
            if n:
                self.log(f"val/acc_{name}", c / n, batch_size=n, sync_dist=True)
        return loss

    def exporter(self, datamodule: Any = None) -> Callable[[Path], None]:
        """The classifier part (config.json + model.safetensors), recording the VAE and noise schedule it knows."""
        classifier = self.classifier
        metadata = {"_trained_with": {"vae": self.hparams.vae_sha256}, "_noise_schedule": self.schedule.to_config()}

        def write(out: Path) -> None:
            save_part(classifier, out, metadata)

        return write
