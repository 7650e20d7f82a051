"""Faults a long run meets: NaN/inf steps, a crash while saving, a corrupt checkpoint, bad and vanishing data."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from tiny_model import TinyImageModel
from torch.utils.data import DataLoader, TensorDataset

from ldm.data.shards import list_shards, read_shard, write_shard
from ldm.data.webdata import WebDataModule
from ldm.io import load_checkpoint
from ldm.training import (
    AtomicCheckpointIO,
    CheckpointLoadError,
    NonFiniteLossError,
    SkipNonFiniteSteps,
    atomic_torch_save,
)

REPO = Path(__file__).resolve().parents[1]


# ---- NaN / inf steps ----------------------------------------------------------------------------------
class Regression(pl.LightningModule):
    """Least squares with Adam; ``bad[i]`` poisons global batch ``i``: "nan_loss" or "inf_grad" (finite loss)."""

    def __init__(self, bad: dict[int, str] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4))
        self.bad = bad or {}
        self.history: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (x @ self.w - y).pow(2).mean()
        mode = self.bad.get(self.trainer.fit_loop.total_batch_idx)
        if mode == "nan_loss":
            loss = loss * float("nan")
        elif mode == "inf_grad":  # d sqrt(u)/du = inf at u = 0: a finite loss with NaN gradients
            loss = loss + torch.sqrt(self.w.sum() * 0)
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.history.append(self.w.detach().clone())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)


def regression_data(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0])), batch_size=4)


def trainer(tmp_path: Path, steps: int, guard: SkipNonFiniteSteps) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                      callbacks=[guard], plugins=[AtomicCheckpointIO()])


def test_nonfinite_steps_are_skipped_on_weights_and_optimizer_and_counted(tmp_path):
    model, guard = Regression({2: "nan_loss", 4: "inf_grad"}), SkipNonFiniteSteps(max_consecutive=3)
    t = trainer(tmp_path, 6, guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, regression_data())
    h = model.history
    assert torch.equal(h[2], h[1]) and torch.equal(h[4], h[3])  # the poisoned steps changed nothing
    assert not torch.equal(h[3], h[2]) and not torch.equal(h[5], h[4])  # the others trained
    assert torch.isfinite(model.w).all()
    assert int(t.optimizers[0].state[model.w]["step"]) == 4  # Adam's moments skipped them too
    assert guard.skipped == 2 and guard.consecutive == 0
    assert t.callback_metrics["train/nonfinite_skipped"].item() == 2


def test_nonfinite_streak_stops_with_the_last_good_weights_in_last_ckpt(tmp_path):
    model, guard = Regression({i: "nan_loss" for i in range(2, 100)}), SkipNonFiniteSteps(max_consecutive=3)
    with pytest.raises(NonFiniteLossError, match=r"3 batches in a row.*last\.ckpt.*--ckpt_path last"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(tmp_path, 20, guard).fit(model, regression_data())
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 5
    assert torch.equal(ckpt["state_dict"]["w"], model.history[1])  # the weights before the streak
    # resuming with healthy data continues from there
    healthy, guard = Regression(), SkipNonFiniteSteps(max_consecutive=3)
    t = trainer(tmp_path, 7, guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(healthy, regression_data(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert t.global_step == 7 and guard.skipped == 3 and len(healthy.history) == 2


# ---- checkpoints: atomic writes, validated loads ---------------------------------------------------------
class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # torch.save fails half-way through writing


def test_failed_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"state_dict": {"w": torch.zeros(100_000)}, "extra": Unpicklable()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))


def test_corrupt_checkpoint_fails_naming_the_file(tmp_path):
    model = Regression()
    t = trainer(tmp_path, 2, SkipNonFiniteSteps())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, regression_data())
    good = tmp_path / "good.ckpt"
    t.save_checkpoint(good)
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)
    assert AtomicCheckpointIO().load_checkpoint(good)["global_step"] == 2
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointLoadError, match=rf"{cut}.*truncated or corrupt.*--ckpt_path"):
        AtomicCheckpointIO().load_checkpoint(cut)
    with pytest.raises(CheckpointLoadError, match=str(cut)):  # through Trainer.fit(ckpt_path=...)
        trainer(tmp_path, 4, SkipNonFiniteSteps()).fit(Regression(), regression_data(), ckpt_path=str(cut))


def test_sigkill_while_saving_never_leaves_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    child = textwrap.dedent(f"""
        import torch
        from ldm.training.checkpoint_io import atomic_torch_save
        for i in range(100000):
            atomic_torch_save({{"i": i, "x": torch.full((1_000_000,), float(i))}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(0.3)  # a few saves in: most of the loop's time is spent writing, so the kill lands mid-write
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = torch.load(path, weights_only=True)
    assert saved["i"] >= 0 and torch.equal(saved["x"], torch.full((1_000_000,), float(saved["i"])))


# ---- data faults during a run --------------------------------------------------------------------------
class CountSamples(Callback):
    """Counts trained samples; at the end of batch ``at`` removes ``vanish`` (a shard not read yet)."""

    def __init__(self, vanish: Path, at: int = 1) -> None:
        self.vanish, self.at, self.samples = vanish, at, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += len(batch["caption"])
        if batch_idx == self.at:
            self.vanish.unlink()


def faulty_copy(src: Path, dst: Path, corrupt_per_shard: dict[int, int], truncate: int) -> tuple[list[str], int]:
    """Copy a dataset, replace the images of the first samples of some shards by garbage, cut one shard in
    half. Returns (train shard paths, samples readable from the truncated shard)."""
    shutil.copytree(src, dst)
    shards = list_shards(dst, "train")
    for index, n_bad in corrupt_per_shard.items():
        samples = list(read_shard(shards[index]))
        for key, files in samples[:n_bad]:
            files["png"] = b"\x89PNG not really"
        write_shard(shards[index], samples)
    data = Path(shards[truncate]).read_bytes()
    Path(shards[truncate]).write_bytes(data[: len(data) // 2 + 100])  # mid-block: a cut the reader detects
    readable = 0
    with pytest.raises(Exception, match="unexpected end"):
        for _, files in read_shard(shards[truncate]):
            readable += "txt" in files and "png" in files
    return shards, readable


def test_corrupt_samples_and_a_truncated_and_a_vanishing_shard_are_skipped_and_counted(tmp_path, shapes_dir):
    # 240 samples in 8 shards of 30; 12 corrupt (5 %) in shards 0-3, shard 5 cut in half, shard 7 deleted mid-run
    shards, readable = faulty_copy(shapes_dir, tmp_path / "data", {0: 3, 1: 3, 2: 3, 3: 3}, truncate=5)
    assert 0 < readable < 30
    counter = CountSamples(Path(shards[7]))
    dm = WebDataModule(str(tmp_path / "data"), batch_size=16, num_workers=2, shuffle_buffer=0, val_split=None)
    t = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[counter])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(TinyImageModel(), dm)
    assert counter.samples == 240 - 12 - (30 - readable) - 30
    # every corrupt sample once, plus one event each for the rest of the cut shard and the vanished one
    assert t.callback_metrics["train/skipped_samples"].item() == 12 + 1 + 1
    # the training base logs each reason once an epoch: 12 PNGs without a PNG body, the cut and the vanished shard
    assert t.callback_metrics["train/skipped/unknown_format"].item() == 12
    assert t.callback_metrics["train/skipped/unreadable_shard"].item() == 2
    assert math.isfinite(t.callback_metrics["train/loss"].item())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_element_among_many_tensors_of_mixed_dtypes(bad):
    from ldm.training.nonfinite import all_finite

    good = [torch.zeros(()), torch.randn(3, 4), torch.full((7,), 60000.0, dtype=torch.float16),  # fp16 near its max
            torch.full((2, 2), 1e18, dtype=torch.bfloat16), torch.ones(5, dtype=torch.float64)]
    assert all_finite(good) and all_finite([])
    for i in range(len(good)):
        tensors = [t.clone() for t in good]
        tensors[i].view(-1)[0] = bad
        assert not all_finite(tensors), (i, bad)
