"""Training checkpoints that survive crashes: atomic writes, validated loads, one place for ``last.ckpt``.

A checkpoint is written to a temporary file in the same folder (``.last.ckpt.XXXX.tmp``), flushed and
fsync'ed, then renamed over the target with ``os.replace`` (atomic on POSIX), and the folder is fsync'ed.
A crash, SIGKILL or full disk during a save therefore leaves the previous checkpoint intact, never half a
file. Lightning's own ``_atomic_save`` goes through an fsspec transaction that writes to the system temp
folder and *moves* the file, which is a copy (not atomic) whenever that folder is on another filesystem.

Loading always uses ``torch.load(weights_only=True)`` (no pickle of arbitrary objects) and a failure names
the file and says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import FSDPStrategy

from ldm.io import CheckpointLoadError, atomic_write, load_checkpoint

__all__ = ["AtomicCheckpointIO", "CheckpointLoadError", "SafeFSDPStrategy", "atomic_torch_save",
           "resume_checkpoint_path", "save_resume_checkpoint"]

# What Lightning needs to resume a fit (a weights-only checkpoint lacks the rest).
RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "global_step", "epoch")


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (``ldm.io.atomic_write``: temp file + fsync + ``os.replace``).

    Streams straight to disk (no second in-memory copy of a large checkpoint)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin: atomic saves (see module docstring) and validated weights-only loads.

    Use it from YAML as ``trainer.plugins: [{class_path: ldm.training.AtomicCheckpointIO}]``. Remote paths
    (``s3://``...) fall back to Lightning's fsspec writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location, require=("state_dict",))


def resume_checkpoint_path(trainer: pl.Trainer) -> Path:
    """The file ``--ckpt_path last`` resumes from: ``last.ckpt`` in the first ModelCheckpoint's folder.

    Without a ModelCheckpoint: ``<default_root_dir>/checkpoints/last.ckpt`` (the folder ``ldm fit`` uses).
    """
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / f"last{ModelCheckpoint.FILE_EXTENSION}"


def save_resume_checkpoint(trainer: pl.Trainer) -> Path:
    """Write the full training state to :func:`resume_checkpoint_path`. Every rank must call it (it syncs)."""
    path = resume_checkpoint_path(trainer)
    trainer.save_checkpoint(path)
    return path


class SafeFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, resuming only from checkpoints that load weights-only.

    Lightning's FSDP resume bypasses the CheckpointIO plugin: a full checkpoint goes through its lazy loader,
    an unpickler that accepts any class, and a sharded one through ``torch.distributed.checkpoint``, whose
    metadata file is a pickle. Here a full checkpoint is first read with :func:`ldm.io.load_checkpoint`
    (``weights_only=True``; anything else is refused with a clear error), and a sharded one is refused
    (write ``state_dict_type: full`` checkpoints, as ``configs/trainer/fsdp.yaml`` does).
    """

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise CheckpointLoadError(f"{path} is a sharded FSDP checkpoint, whose metadata torch reads with pickle; "
                                      "ldm resumes FSDP runs from full checkpoints only "
                                      "(strategy state_dict_type: full)")
        load_checkpoint(path)  # weights-only check of the whole file before Lightning's own loader touches it
        return super().load_checkpoint(path, weights_only=True)


class FinalCheckpoint(pl.Callback):
    """At the end of a completed fit, ``last.ckpt`` holds the final state.

    Lightning's ModelCheckpoint writes ``last.ckpt`` with its validation checkpoints and, at the end of training,
    only when it never wrote one: a run that stops between two validations (``max_steps`` or a time budget that
    is not a multiple of ``val_check_interval``) kept the state of its last validation, and ``ldm export`` of
    ``last.ckpt`` dropped the steps after it (up to a fifth of a ``make demo`` U-Net's). Every rank calls this
    hook; nothing is written when checkpointing is off (no ModelCheckpoint with ``save_last``) or when one was
    written at this very step. A fit that ends in an exception or a preemption keeps its own checkpoint."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        keepers = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
        if not keepers or trainer.global_step == 0:
            return
        if any(getattr(cb, "_last_global_step_saved", None) == trainer.global_step for cb in keepers):
            return
        save_resume_checkpoint(trainer)
