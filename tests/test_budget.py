"""LR schedules over the live plan, and FitToTimeBudget fitting the run (and its cosine) into max_time."""

from __future__ import annotations

import math
import time

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ldm.training import FitToTimeBudget, planned_steps, warmup_cosine


def test_warmup_cosine_values():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)                 # half-way: cos(pi/2) = 0
    assert warmup_cosine(60, 10, 110, floor=0.2) == pytest.approx(0.6)
    assert warmup_cosine(110, 10, 110, floor=0.2) == pytest.approx(0.2)
    assert warmup_cosine(500, 10, 110, floor=0.2) == pytest.approx(0.2)     # past the end: stays at the floor
    assert warmup_cosine(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(500, 10, math.inf) == 1.0 and warmup_cosine(500, 10, None) == 1.0
    assert warmup_cosine(0, 0, 100) == 1.0


def test_plan_from_measured_rate():
    cb = FitToTimeBudget(every=20, margin=0.0)
    cb.ceiling = 10_000
    assert cb.plan(20, 10.0, 90.0) is None                    # first check: reference point only
    assert cb.plan(40, 20.0, 80.0) == 40 + 160                # 2 steps/s over the window, 80 s left
    cb.margin = 0.25
    assert cb.plan(60, 30.0, 70.0) == 60 + int(70 * 0.75 * 2)
    cb.ceiling = 100
    assert cb.plan(80, 40.0, 60.0) == 100                     # never above the configured max_steps
    assert cb.plan(99, 1e6, 0.0) == 100                        # out of time: stop at the next step
    with pytest.raises(ValueError):
        FitToTimeBudget(every=0)


def test_a_resumed_run_keeps_its_plan():
    from types import SimpleNamespace

    cb = FitToTimeBudget(every=20, margin=0.0)
    cb.ceiling = 10_000
    cb.plan(20, 10.0, 90.0)
    cb.planned = cb.plan(40, 20.0, 80.0)
    restored = FitToTimeBudget()
    restored.load_state_dict(cb.state_dict())
    trainer = SimpleNamespace(max_steps=10_000, global_step=120, callbacks=[],
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=10_000)))
    restored.on_train_start(trainer, None)
    assert trainer.fit_loop.epoch_loop.max_steps == 200        # not the configured 10,000 until it re-plans
    fresh = SimpleNamespace(max_steps=500, global_step=0, callbacks=[],
                            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=500)))
    FitToTimeBudget().on_train_start(fresh, None)
    assert fresh.fit_loop.epoch_loop.max_steps == 500          # nothing saved: the configured ceiling


class SlowRegression(pl.LightningModule):
    """Each step sleeps ``delay`` s; the LR schedule is warmup_cosine over planned_steps (as every part's)."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.net = nn.Linear(2, 1)
        self.factors: list[float] = []

    def training_step(self, batch, batch_idx):
        time.sleep(self.delay)
        self.factors.append(self.lr_schedulers().get_last_lr()[0] / 0.1)
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        trainer = self.trainer
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 5, planned_steps(trainer)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_run_and_cosine_end_inside_max_time(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)
    model = SlowRegression(delay=0.01)
    trainer = pl.Trainer(max_steps=100_000, max_time={"seconds": 3},
                         callbacks=[FitToTimeBudget(every=10, margin=0.1)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    start = time.monotonic()
    trainer.fit(model, data)
    elapsed = time.monotonic() - start
    assert trainer.global_step == trainer.max_steps < 100_000      # the plan stopped it, not the timer
    assert 50 < trainer.global_step < 300                            # ~10 ms per step in ~3 s
    assert elapsed < 3.5
    assert model.factors[-1] < 0.05                                  # the cosine ran to its end
    assert max(model.factors) == pytest.approx(1.0)


def test_without_max_time_the_plan_is_untouched(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)
    model = SlowRegression(delay=0.0)
    trainer = pl.Trainer(max_steps=30, callbacks=[FitToTimeBudget(every=5)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert trainer.global_step == trainer.max_steps == 30
    assert model.factors[-1] == pytest.approx(warmup_cosine(29, 5, 30))


def test_a_deadline_alone_ends_the_run_and_its_cosine_before_it(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)
    model = SlowRegression(delay=0.01)
    deadline = time.time() + 3.0
    trainer = pl.Trainer(max_steps=100_000, callbacks=[FitToTimeBudget(every=10, margin=0.1, deadline=deadline)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)  # the deadline counts the trainer's set-up too, unlike max_time
    assert trainer.global_step == trainer.max_steps < 100_000
    assert 50 < trainer.global_step < 300
    assert time.time() < deadline + 0.3
    assert model.factors[-1] < 0.05


def test_a_deadline_earlier_than_max_time_wins_and_a_passed_one_stops_at_the_next_check(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)
    model = SlowRegression(delay=0.0)
    trainer = pl.Trainer(max_steps=1_000, max_time={"seconds": 60},
                         callbacks=[FitToTimeBudget(every=5, deadline=time.time() - 1)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert trainer.global_step == 5
