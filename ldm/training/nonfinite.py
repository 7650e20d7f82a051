"""Skip optimizer steps whose loss or gradients are NaN/inf; stop cleanly when it keeps happening.

Before every optimizer step (after backward, gradient all-reduce and any AMP unscaling) the guard checks
the loss(es) seen since the previous step and the gradients of the optimizer's parameters. If anything is
non-finite on *any* rank (one scalar all-reduce, so the ranks never disagree), every rank drops the
gradients (``p.grad = None``), so the optimizer leaves those parameters and their moments untouched:
the step is skipped, like an AMP GradScaler skips an overflowing step. Lightning still counts the step
(``global_step``) and steps the LR schedulers, and an EMA update averages in unchanged weights.

Skipped steps are counted (``train/nonfinite_skipped``, saved in checkpoints). After ``max_consecutive``
batches in a row with a skipped step, the weights are still those before the streak: the guard writes
them to ``last.ckpt`` and raises :class:`NonFiniteLossError` with what to try next.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ldm.training.checkpoint_io import save_resume_checkpoint
from ldm.training.preemption import agree_across_ranks


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite: the sum of their L2 norms, each computed in fp32 or wider (an
    fp16 tensor's cannot overflow), is finite; one device sync. NaN and inf carry through a norm; a finite tensor whose
    fp32 norm overflows (elements beyond ~1e19) counts as non-finite too, which is what gradient clipping would make
    of it. 5x faster than an ``isfinite().all()`` per tensor on the shapes U-Net's 378 gradients (4 vs 19-23 ms on
    one CPU thread; a max-abs norm, 18 ms, is not)."""
    if not tensors:
        return True
    wide = (torch.float32, torch.float64)
    norms = [torch.linalg.vector_norm(t, dtype=None if t.dtype in wide else torch.float32).to(tensors[0].device,
                                                                                              torch.float32)
             for t in tensors]
    return bool(torch.isfinite(torch.stack(norms).sum()))


class SkipNonFiniteSteps(Callback):
    """Skip (and count) optimizer steps with a non-finite loss or gradient; stop after ``max_consecutive``.

    Args:
        max_consecutive: batches in a row with a skipped step before the run stops (0: never stop).
        check_gradients: also test the gradients, not only the loss (catches NaNs produced in backward).
    """

    def __init__(self, max_consecutive: int = 20, check_gradients: bool = True) -> None:
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.check_gradients = check_gradients
        self.skipped = 0          # optimizer steps skipped in the whole run (resumed from checkpoints)
        self.consecutive = 0      # batches in a row that had a skipped step
        self.first_bad_step: int | None = None
        self._losses: list[torch.Tensor] = []
        self._skipped_in_batch = False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "first_bad_step": self.first_bad_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.first_bad_step = state_dict.get("first_bad_step")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._skipped_in_batch = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        checked = self._losses + ([p.grad for p in params] if self.check_gradients else [])
        self._losses = []
        bad = agree_across_ranks(int(not all_finite(checked)))
        if not bad:
            return
        for p in params:
            p.grad = None
        self.skipped += 1
        self._skipped_in_batch = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._skipped_in_batch:
            if self.consecutive == 0:
                self.first_bad_step = trainer.global_step
            self.consecutive += 1
        else:
            self.consecutive = 0
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False, batch_size=1,
                      reduce_fx="max")
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            self.consecutive = 0  # the checkpoint resumes with a fresh count
            path = save_resume_checkpoint(trainer)
            raise NonFiniteLossError(
                f"{self.max_consecutive} batches in a row had a NaN/inf loss or gradient (from optimizer step "
                f"{self.first_bad_step}); their updates were skipped, so the weights before them are intact and "
                f"saved to {path}. Lower the learning rate, set gradient clipping (trainer.gradient_clip_val) or "
                "precision 32-true, check the data, then resume with --ckpt_path last.")
