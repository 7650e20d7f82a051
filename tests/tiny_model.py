"""A trivial LightningModule that proves the `ldm fit` plumbing (LightningCLI + WebDataModule + loggers)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.models.base import PartModule


class TinyImageModel(PartModule):
    """Predicts the mean colour of each image with one conv; logs train/loss and val/loss."""

    def __init__(self, width: int = 4, lr: float = 1e-2):
        super().__init__()  # the training base's optimizer blocks are unused: configure_optimizers below
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(width, 3))

    def _loss(self, batch):
        target = batch["image"].mean(dim=(2, 3))
        return (self.net(batch["image"]) - target).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, batch_size=len(batch["caption"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), batch_size=len(batch["caption"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def exporter(self, datamodule=None):
        def write(out: Path) -> None:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(self.net.state_dict(), out / "net.pt")

        return write
