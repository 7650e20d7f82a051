"""What every trainable part's LightningModule shares: a checkpoint that names its classes, and export.

A ``.ckpt`` written by a :class:`PartModule` records the module's class path and its datamodule's
class path + init args, so ``ldm export --ckpt PATH --out DIR`` can rebuild both from the file alone
(hyper-parameters are plain JSON-like values, so ``weights_only=True`` loading works).
"""

from __future__ import annotations

import abc
import importlib
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytorch_lightning as pl
import torch
import torch.distributed as dist

CLASS_KEY = "ldm_class_path"
DATAMODULE_KEY = "ldm_datamodule"
T = TypeVar("T")


def class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def import_ldm_class(path: str) -> type:
    """Import ``ldm.a.b.Class``; anything outside the ``ldm`` package is refused (no arbitrary code)."""
    module_name, _, name = path.rpartition(".")
    if not (module_name == "ldm" or module_name.startswith("ldm.")):
        raise ValueError(f"refusing to import {path!r}: only classes inside the ldm package are loaded")
    return getattr(importlib.import_module(module_name), name)


def local_log_dir(trainer: pl.Trainer) -> Path:
    """The run's log folder, found on this rank alone.

    ``trainer.log_dir`` broadcasts from rank 0, so calling it from a rank-0-only code path (sample grids,
    image logging) makes DDP wait forever; this reads the first logger's folder instead.
    """
    if trainer.loggers:
        folder = getattr(trainer.loggers[0], "log_dir", None) or getattr(trainer.loggers[0], "save_dir", None)
        if folder:
            return Path(folder)
    return Path(trainer.default_root_dir)


def rank_zero_write(write: Callable[[], T]) -> T | None:
    """Run ``write`` (writing an export) on global rank 0 only; every rank returns once it is done.

    Under ``torch.distributed`` every rank must call this (an all-reduce doubles as the barrier): the other
    ranks wait for rank 0 and raise too if its ``write`` failed, instead of hanging. Without a process
    group ``write`` just runs. Returns ``write()``'s result on rank 0, ``None`` elsewhere.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return write()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = write()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = e
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    failed = torch.tensor([int(error is not None)], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("the export failed on rank 0 (its error is in rank 0's log)")
    return result


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
