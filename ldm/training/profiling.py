"""Where a training step's time goes: data, forward, backward, optimizer, and the gradient all-reduce.

:class:`StepTimer` marks phase boundaries with Lightning hooks and charges the wall time since the
previous mark to the phase that was running:

    batch end → batch start             data   (fetch, host→device copy; plus validation when it runs)
    batch start → before backward       forward (training_step up to the loss)
    before backward → after backward    backward (DDP's all-reduce overlaps it and ends inside it)
    after backward → before opt. step   forward (manual optimization: the next forward; gradient clipping)
    before opt. step → batch end        optimizer (step, EMA update, LR schedulers, logging)

On CUDA every mark synchronizes the device (``synchronize=True``), or the times would measure kernel
launches. The all-reduce itself runs on a communication thread/stream, so it cannot be cut out of the
backward by hooks; :class:`AllReduceTimer` registers a DDP communication hook that does the same averaging
all-reduce as DDP's default and records each bucket's time from launch to completion (overlapped with
backward, so it is not additive with the phases above).
"""

import time  # no `from __future__ import annotations`: DDP checks the comm hook's annotations as real types
from collections import defaultdict
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

PHASES = ("data", "forward", "backward", "optimizer")


class StepTimer(Callback):
    """Accumulate per-phase wall time over training batches (see the module docstring).

    Args:
        skip_first: batches ignored at the start (warm-up, lazy initialisation, first worker start).
        synchronize: synchronize CUDA devices at every mark (needed for meaningful GPU times).
    """

    def __init__(self, skip_first: int = 2, synchronize: bool = True) -> None:
        self.skip_first = skip_first
        self.synchronize = synchronize
        self.seconds: dict[str, float] = defaultdict(float)
        self.batches = 0
        self._seen = 0
        self._phase: str | None = None
        self._mark = 0.0
        self._device: torch.device | None = None

    def _switch(self, phase: str | None) -> None:
        if self._device is not None and self._device.type == "cuda" and self.synchronize:
            torch.cuda.synchronize(self._device)
        now = time.perf_counter()
        if self._phase is not None and self._seen > self.skip_first:
            self.seconds[self._phase] += now - self._mark
        self._phase, self._mark = phase, now

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device = pl_module.device
        self._phase = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._seen += 1
        if self._seen == self.skip_first + 1:  # the first timed batch: its data time starts unmeasured
            self._phase = None
        self._switch("forward")

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._switch("backward")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch("forward")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._switch("optimizer")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._switch("data")
        if self._seen > self.skip_first:
            self.batches += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase = None  # the time after the last batch is not data time

    def summary(self) -> dict[str, float]:
        """Mean milliseconds per timed batch for each phase, and their sum (``step``)."""
        n = max(1, self.batches)
        out = {phase: 1000 * self.seconds.get(phase, 0.0) / n for phase in PHASES}
        out["step"] = sum(out.values())
        return out


class AllReduceTimer(Callback):
    """Time the gradient all-reduce: a DDP communication hook doing DDP's default math (``all_reduce`` of
    ``grad / world_size``) that records each bucket's time from launch to completion.

    Add it as a callback: at train start it registers itself on the DDP-wrapped model (Lightning's own
    ``ddp_comm_hook`` option only registers hooks on CUDA; this works on gloo/CPU too). Without DDP it
    does nothing. ``skip_first`` batches are not counted.
    """

    def __init__(self, skip_first: int = 2) -> None:
        self.skip_first = skip_first
        self.seconds, self.calls, self.bytes, self.batches = 0.0, 0, 0, 0
        self._seen = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.register_comm_hook(self, AllReduceTimer.hook)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._seen += 1
        if self._seen == self.skip_first + 1:
            self.seconds, self.calls, self.bytes, self.batches = 0.0, 0, 0, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._seen > self.skip_first:
            self.batches += 1

    def summary(self) -> dict[str, float]:
        """Per timed batch: all-reduce milliseconds (overlapped with backward), calls and MiB reduced."""
        n = max(1, self.batches)
        return {"allreduce": 1000 * self.seconds / n, "allreduce_calls": self.calls / n,
                "allreduce_mib": self.bytes / n / 2**20}

    @staticmethod
    def hook(state: "AllReduceTimer", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """DDP comm hook: ``all_reduce(grad / world_size)`` (the default's math), recording launch→done time."""
        buffer = bucket.buffer()
        buffer.div_(dist.get_world_size())
        start = time.perf_counter()
        future = dist.all_reduce(buffer, async_op=True).get_future()

        def done(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            state.seconds += time.perf_counter() - start
            state.calls += 1
            state.bytes += buffer.numel() * buffer.element_size()
            return fut.value()[0]

        return future.then(done)
