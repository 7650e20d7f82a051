"""Exact resume: the random streams and the data stream continue as if the run had never stopped.

Lightning's checkpoint restores weights, optimizer and LR-scheduler state, the step/epoch counters and
(the EMA being a submodule) the EMA weights. Two things it does not restore, and this module does:

* **Randomness.** :class:`SeedEveryStep` reseeds ``torch`` (CPU and CUDA), ``numpy`` and ``random`` at the
  start of every training batch from ``(seed, batch index, rank)``. The noise, timesteps, caption dropout
  and posterior samples of batch *n* are then a function of *n* alone, whatever ran before (validation,
  sample logging, a restart). It also gives each DDP rank its own stream: with one global seed every rank
  would draw the *same* noise for its different images.
* **Data position.** :class:`ResumableLoader` is a DataLoader with ``state_dict``/``load_state_dict``, so
  Lightning saves its pass number and the batches already trained in the checkpoint and restores them
  before creating the iterator. The pass number seeds the shuffle (and a ``ShardDataset``'s ``epoch``), and
  the resumed pass skips the batches already trained. Skipping re-reads them (exact with any number of
  workers, costs the loading time of those batches, not their training).
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.data import sized_len
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader


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


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of pass ``epoch`` (pass 0 uses ``seed`` itself)."""
    return seed + 1_000_003 * epoch


class ResumableLoader(DataLoader):
    """A DataLoader whose stream position is part of Lightning checkpoints (see the module docstring).

    Each ``iter()`` is one pass: pass *e* reseeds the loader's generator with ``epoch_seed(seed, e)`` (so the
    shuffle order and worker seeds depend only on *e*) and sets ``dataset.epoch = e`` when the dataset has
    that attribute (``ShardDataset``). Under DDP, Lightning swaps in a ``DistributedSampler`` and calls its
    ``set_epoch`` itself; the position bookkeeping is the same.

    Args:
        dataset: any map-style or iterable dataset.
        seed: shuffle seed of pass 0; a generator is created when none is given.
        **kwargs: DataLoader arguments.
    """

    def __init__(self, dataset: Any, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(dataset, *args, **kwargs)
        self.seed = seed
        self.epoch = -1            # the pass being (or last) iterated
        self._next_epoch = 0       # the pass the next iter() starts
        self._skip = 0             # batches the next iter() skips (set by load_state_dict)
        self._yielded = 0          # batches of this pass handed out (skipped ones included)
        self._finished = False

    def set_epoch(self, epoch: int) -> None:
        """Make pass ``epoch`` reproducible: reseed the generator, tell the dataset."""
        if self.generator is not None:
            self.generator.manual_seed(epoch_seed(self.seed, epoch))
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        epoch, skip = self._next_epoch, self._skip
        self._next_epoch, self._skip = epoch + 1, 0
        self.epoch, self._yielded, self._finished = epoch, 0, False
        self.set_epoch(epoch)
        return self._stream(self._source(), skip)

    def _source(self) -> Iterator[Any]:
        """The batches of one pass (subclasses may reshape the stream, e.g. pad it to a fixed length)."""
        return super().__iter__()

    def _stream(self, iterator: Iterator[Any], skip: int) -> Iterator[Any]:
        for batch in iterator:
            self._yielded += 1
            if self._yielded > skip:
                yield batch
        self._finished = True

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches", "finished"}``: the pass and the batches of it the trainer has taken.

        Lightning pre-fetches one batch ahead when a loader has no length; that batch is not trained yet,
        so it is not counted (unless the pass is over).
        """
        prefetched = 0 if self._finished or sized_len(self) is not None else 1
        return {"epoch": self.epoch, "batches": max(0, self._yielded - prefetched), "finished": self._finished}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue pass ``epoch`` after its first ``batches`` batches (or start the next pass if it was over)."""
        epoch, batches = int(state_dict.get("epoch", -1)), int(state_dict.get("batches", 0))
        length = sized_len(self)
        if epoch < 0:
            self._next_epoch, self._skip = 0, 0
        elif state_dict.get("finished") or (length is not None and batches >= length):
            self._next_epoch, self._skip = epoch + 1, 0
        else:
            self._next_epoch, self._skip = epoch, batches
