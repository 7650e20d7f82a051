"""Preemption: SIGTERM / SIGUSR1 → a checkpoint at the next batch boundary → exit, on every rank together.

Clusters announce preemption with a signal (SLURM: SIGTERM, or SIGUSR1 with ``--signal=USR1@90``;
Kubernetes and torchrun: SIGTERM). The handler only records the signal (nothing unsafe runs inside a
signal handler; no collective is issued there). At the end of each training batch the ranks agree with
one all-reduce (MAX) whether any of them was signalled, so they all stop after the *same* batch even when
the signal reached only some of them; then every rank takes part in writing ``last.ckpt`` (atomically with
:class:`~ldm.training.AtomicCheckpointIO`) and raises :class:`Preempted`, a ``SystemExit`` with status
128 + signal number. ``ldm fit ... --ckpt_path last`` continues exactly where the run stopped.

When the whole process group is signalled (a scheduler's time limit, ``kill -- -PGID``), the DataLoader
workers of every ldm loader ignore the signal (``ldm.data.workers``; the callback registers its signals
there) and keep delivering batches until this process has saved and shuts them down normally.

This replaces Lightning's own SIGTERM handling during training (which broadcasts from inside the signal
handler and exits without a checkpoint); Lightning restores the original handlers at teardown.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from ldm.data.workers import shield_in_workers
from ldm.dist import all_reduce
from ldm.training.checkpoint_io import save_resume_checkpoint


class Preempted(SystemExit):
    """Raised on every rank once the preemption checkpoint is written; ``code`` is 128 + signal number."""

    def __init__(self, signum: int, path: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.path = signum, path


def signal_number(name: str | int) -> int:
    """``"SIGTERM"``/``"TERM"``/``15`` → 15; a clear error for names this platform does not have."""
    if isinstance(name, int):
        return int(signal.Signals(name))
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    if not hasattr(signal, key):
        raise ValueError(f"unknown signal {name!r} in PreemptionCheckpoint(signals=...): "
                         "use names like SIGTERM, SIGUSR1")
    return int(getattr(signal, key))


def agree_across_ranks(value: int) -> int:
    """The maximum of ``value`` over all ranks (``value`` itself without a process group)."""
    return int(all_reduce(torch.tensor([value], dtype=torch.int64), "max").item())


class PreemptionCheckpoint(Callback):
    """On SIGTERM/SIGUSR1: write ``last.ckpt`` at the next batch end on all ranks, then exit 128 + signal.

    Args:
        signals: signal names to treat as preemption.
        check_every_n_batches: how often the ranks compare notes (one scalar all-reduce; on GPUs each check
            also waits for the queued work, so a larger value costs less and reacts later).
        exit: raise :class:`Preempted` after saving (default). ``False``: only stop the fit (``should_stop``);
            note that Lightning then runs its epoch-end hooks before returning.
    """

    def __init__(self, signals: list[str] | None = None, check_every_n_batches: int = 1, exit: bool = True) -> None:
        self.signals = [signal_number(s) for s in (["SIGTERM", "SIGUSR1"] if signals is None else signals)]
        shield_in_workers(self.signals)  # loader workers leave these to this process
        if check_every_n_batches < 1:
            raise ValueError(f"check_every_n_batches must be >= 1, got {check_every_n_batches}")
        self.check_every_n_batches = check_every_n_batches
        self.exit = exit
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._launcher: Any = None

    # ---- signal handling (main thread only; the handler just records) ----------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = signum
        # Lightning's subprocess launcher: rank 0 is the parent of the other local ranks; pass the signal on
        if first and self._launcher is not None and hasattr(self._launcher, "kill"):
            self._launcher.kill(signum)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installs its own SIGTERM handler just before training starts; ours goes in after it.
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread, signal handlers not installed")
            return
        self.received = None
        self._launcher = getattr(trainer.strategy, "launcher", None)
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # ---- the decision, at a batch boundary every rank reaches -------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % self.check_every_n_batches:
            return
        signum = agree_across_ranks(self.received or 0)
        if not signum:
            return
        path = save_resume_checkpoint(trainer)
        name = signal.Signals(signum).name
        if trainer.is_global_zero:
            print(f"ldm: {name} received: saved the training state at step {trainer.global_step} to {path}; "
                  "resume with --ckpt_path last", flush=True)
        self._restore_handlers()
        if self.exit:
            raise Preempted(signum, str(path))
        trainer.should_stop = True
