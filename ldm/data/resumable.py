"""A DataLoader whose position in its stream is saved in Lightning checkpoints, for exact resume.

Lightning saves a loader's ``state_dict`` in the checkpoint and calls ``load_state_dict`` before creating
the iterator again; :class:`ResumableLoader` stores the pass number and the batches already trained. The
pass number seeds the shuffle (and a ``ShardDataset``'s ``epoch``), and the resumed pass skips the batches
already trained. Skipping re-reads them (exact with any number of workers, costs the loading time of those
batches, not their training). The random streams are reseeded per step by ``ldm.training.SeedEveryStep``.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from lightning_fabric.utilities.data import sized_len

from ldm.data.workers import ShieldedLoader


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of pass ``epoch`` (pass 0 uses ``seed`` itself)."""
    return seed + 1_000_003 * epoch


class ResumableLoader(ShieldedLoader):
    """A DataLoader whose stream position is part of Lightning checkpoints (see the module docstring).

    Its worker processes leave preemption signals to the main process (``ldm.data.workers``).

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
