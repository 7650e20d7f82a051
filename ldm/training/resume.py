"""Exact resume: the random streams and the data stream continue as if the run had never stopped.

Lightning's checkpoint restores weights, optimizer and LR-scheduler state, the step/epoch counters and
(the EMA being a submodule) the EMA weights. Two things it does not restore, and this module does:

* **Randomness.** :class:`SeedEveryStep` reseeds ``torch`` (CPU and CUDA), ``numpy`` and ``random`` at the
  start of every training batch from ``(seed, batch index, rank)``. The noise, timesteps, caption dropout
  and posterior samples of batch *n* are then a function of *n* alone, whatever ran before (validation,
  sample logging, a restart). It also gives each DDP rank its own stream: with one global seed every rank
  would draw the *same* noise for its different images.
* **Data position.** :class:`~ldm.data.resumable.ResumableLoader` is a DataLoader with
  ``state_dict``/``load_state_dict``, so Lightning saves its pass number and the batches already trained in the
  checkpoint and restores them before creating the iterator. The pass number seeds the shuffle (and a ``ShardDataset``'s
  ``epoch``), and the resumed pass skips the batches already trained. Skipping re-reads them (exact with any number of
  workers, costs the loading time of those batches, not their training).
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


def step_seed(seed: int, batch_index: int, rank: int) -> int:
    """A 63-bit seed for one (run seed, global batch index, rank): independent streams per batch and rank."""
    digest = hashlib.blake2b(f"ldm/{seed}/{batch_index}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_all(seed: int) -> None:
    """Seed ``torch`` (all devices), ``numpy`` and ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class SeedEveryStep(Callback):
    """Reseed all RNGs at every training batch from ``(seed, global batch index, rank)``.

    Args:
        seed: run seed; default: ``seed_everything``'s (``PL_GLOBAL_SEED``), else 0.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def base_seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # batches started over the whole run, minus one; restored exactly from checkpoints
        index = trainer.fit_loop.total_batch_idx
        seed_all(step_seed(self.base_seed(), index, trainer.global_rank))

