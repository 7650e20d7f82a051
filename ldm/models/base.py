"""What every trainable part's LightningModule shares: a checkpoint that names its classes, and export.

A ``.ckpt`` written by a :class:`PartModule` records the module's class path and its datamodule's
class path + init args, so ``ldm export --ckpt PATH --out DIR`` can rebuild both from the file alone
(hyper-parameters are plain JSON-like values, so ``weights_only=True`` loading works).
"""

from __future__ import annotations

import abc
import importlib
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

CLASS_KEY = "ldm_class_path"
DATAMODULE_KEY = "ldm_datamodule"


def class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def import_ldm_class(path: str) -> type:
    """Import ``ldm.a.b.Class``; anything outside the ``ldm`` package is refused (no arbitrary code)."""
    module_name, _, name = path.rpartition(".")
    if not (module_name == "ldm" or module_name.startswith("ldm.")):
        raise ValueError(f"refusing to import {path!r}: only classes inside the ldm package are loaded")
    return getattr(importlib.import_module(module_name), name)


class PartModule(pl.LightningModule, abc.ABC):
    """A LightningModule that trains one exportable part (VAE, text conditioner, U-Net)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLASS_KEY] = class_path(self)
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is not None:
            checkpoint[DATAMODULE_KEY] = {"class_path": class_path(dm), "init_args": dict(dm.hparams)}

    @abc.abstractmethod
    def export(self, out_dir: str | Path, datamodule: pl.LightningDataModule | None = None) -> Path:
        """Write the trained part to ``out_dir`` (config.json + model.safetensors, see ``ldm.io``)."""
