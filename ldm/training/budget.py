"""Learning-rate schedules that end when the run ends, whether steps or the wall clock run out first.

Every part trains with linear warm-up then cosine decay (:func:`warmup_cosine`, SGDR, Loshchilov & Hutter
2017, eq. 5 without restarts) over :func:`planned_steps` = the *live* ``trainer.max_steps``. With a wall-clock
budget (``trainer.max_time``) alone, a run planned for ``max_steps`` is cut wherever the clock stops it —
mid-schedule, at a high learning rate (a shapes VAE cut at 880 of its planned steps lost 2.6 dB).
:class:`FitToTimeBudget` closes that gap: it re-plans ``max_steps`` from the measured throughput so the
run, and with it every schedule reading :func:`planned_steps`, ends just before ``max_time`` (or a wall-clock
``deadline``: ``ldm fit --end-by``). The same config then does as many steps as the machine allows in the budget,
and always finishes its schedule.
"""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, Timer


def warmup_cosine(step: int, warmup: int, total: float | None, floor: float = 0.0) -> float:
    """LR multiplier after ``step`` optimizer steps: ``(step+1)/warmup`` during warm-up, then
    ``floor + (1 − floor)·½(1 + cos(π·p))`` with ``p = (step − warmup)/(total − warmup)`` clipped to [0, 1]
    (SGDR eq. 5); constant 1 after warm-up when ``total`` is unknown (None or inf)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total is None or not math.isfinite(total) or total <= warmup:
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / (total - warmup)))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_steps(trainer: pl.Trainer | None) -> float:
    """The run's optimizer steps as planned *now*: ``trainer.max_steps`` (which :class:`FitToTimeBudget`
    lowers to fit ``max_time``), else Lightning's estimate from ``max_epochs``; inf when unbounded."""
    if trainer is None:
        return math.inf
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return float(trainer.max_steps)
    return float(trainer.estimated_stepping_batches)


class FitToTimeBudget(Callback):
    """Lower ``trainer.max_steps`` so that the run ends, with its LR schedule, inside ``trainer.max_time`` and
    before ``deadline`` (epoch seconds), whichever comes first.

    Every ``every`` optimizer steps, rank 0 measures the throughput since the first check (which skips the
    slower first steps) and plans ``max_steps = done + remaining × steps/s × (1 − margin)``, never above the
    configured ``max_steps``; the plan is broadcast, so all ranks stop together and agree on the LR.
    Validation and checkpoint time inside the window count as part of the throughput. Does nothing without
    ``max_time`` or ``deadline``. Lightning's own timer still stops the run if the plan overshoots ``max_time``;
    past the deadline the run stops at the next check. ``max_time`` counts from the start of training, the
    deadline is a time of day: what a process start, a second DDP rank's start and the set-up take comes out of
    it, which suits a run that must end by a given time (a scheduler's wall-clock limit, the demo's budget). The
    plan is saved in checkpoints, so a resumed run keeps its LR schedule (Lightning's timer resumes the elapsed
    time).

    Args:
        every: optimizer steps between two plans.
        margin: fraction of the remaining time kept free (final checkpoint, the last validation).
        deadline: ``time.time()`` by which training must have ended (None: only ``max_time``).
    """

    def __init__(self, every: int = 20, margin: float = 0.03, deadline: float | None = None) -> None:
        if every < 1 or not 0.0 <= margin < 1.0:
            raise ValueError(f"FitToTimeBudget: every must be >= 1 and margin in [0, 1), got {every}, {margin}")
        self.every, self.margin, self.deadline = every, margin, deadline
        self._started = time.monotonic()
        self.ceiling: float = math.inf
        self.reference: tuple[int, float] | None = None
        self.last_step = -1
        self.planned: int | None = None
        self.timer: Timer | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # there iff max_time is set
        configured = trainer.max_steps
        self.ceiling = float(configured) if configured is not None and configured > 0 else math.inf
        self.reference, self.last_step, self._started = None, trainer.global_step, time.monotonic()
        if self.planned is not None:  # resumed: the plan the checkpoint was written under
            trainer.fit_loop.epoch_loop.max_steps = int(min(self.ceiling, max(self.planned, trainer.global_step + 1)))

    def state_dict(self) -> dict[str, int | None]:
        return {"planned": self.planned}

    def load_state_dict(self, state_dict: dict[str, int | None]) -> None:
        self.planned = state_dict.get("planned")

    def plan(self, step: int, elapsed: float, remaining: float) -> int | None:
        """The new max_steps after ``step`` steps in ``elapsed`` s with ``remaining`` s left (None: not yet)."""
        if self.reference is None:
            self.reference = (step, elapsed)
            return None
        ref_step, ref_elapsed = self.reference
        rate = (step - ref_step) / max(elapsed - ref_elapsed, 1e-9)
        planned = step + int(remaining * (1.0 - self.margin) * rate)
        return int(min(self.ceiling, max(step + 1, planned)))

    def elapsed_and_remaining(self) -> tuple[float, float] | None:
        """(seconds trained in this process, seconds left): the tighter of ``max_time`` and the deadline; None
        when neither is set."""
        elapsed = time.monotonic() - self._started
        left = [] if self.timer is None else [self.timer.time_remaining("train")]
        if self.deadline is not None:
            left.append(self.deadline - time.time())
        left = [r for r in left if r is not None]
        return (elapsed, min(left)) if left else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        step = trainer.global_step
        if step == self.last_step or step % self.every:
            return
        times = self.elapsed_and_remaining()
        if times is None:
            return
        self.last_step = step
        elapsed, remaining = times
        planned = self.plan(step, elapsed, max(remaining, 0.0)) if remaining > 0 else step  # past it: stop now
        planned = trainer.strategy.broadcast(planned, src=0)
        if planned is not None and planned != trainer.max_steps:
            self.planned = planned
            trainer.fit_loop.epoch_loop.max_steps = planned
            pl_module.log("train/planned_steps", float(planned), rank_zero_only=True)
