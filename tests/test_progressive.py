"""Progressive resolution: a new fit continues a run at another resolution (weights, optimizer, step count)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from ldm.data.webdata import WebDataModule
from ldm.errors import UsageError
from ldm.io import load_checkpoint
from ldm.training import ContinueFrom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import TinyImageModel  # noqa: E402


class StagedModel(TinyImageModel):
    """TinyImageModel with the training base's AdamW + warm-up/cosine schedule and a resolution-shaped tensor
    (like a learned position table)."""

    def __init__(self, resolution: int = 16, width: int = 4):
        super().__init__(width=width)
        self.position = nn.Parameter(torch.zeros(1, 3, resolution, resolution))

    def _loss(self, batch):
        image = batch["image"] + self.position
        return (self.net(image) - batch["image"].mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return super(TinyImageModel, self).configure_optimizers()


def _fit(root, resolution, max_steps, callbacks=(), ckpt_path=None):
    torch.manual_seed(0)
    model = StagedModel(resolution)
    dm = WebDataModule(str(root[0]), resolution=resolution, batch_size=4, num_workers=0, shuffle_buffer=0)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=root[1], callbacks=list(callbacks),
                         enable_checkpointing=False)
    seen = []
    model.on_train_batch_start = lambda batch, i: seen.append(tuple(batch["image"].shape[2:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, seen


def test_a_higher_resolution_stage_continues_the_weights_optimizer_and_steps(shapes_dir, tmp_path):
    first, first_model, sizes = _fit((shapes_dir, tmp_path / "a"), 16, 3)
    assert sizes == [(16, 16)] * 3
    ckpt = tmp_path / "stage1.ckpt"
    first.save_checkpoint(ckpt)
    saved = load_checkpoint(ckpt)

    captured = {}

    class Spy(pl.Callback):  # the state right after ContinueFrom loaded it, before the first new step
        def on_train_start(self, trainer, pl_module):
            captured["weights"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            captured["step"] = trainer.global_step
            captured["lr_step"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch
            opt = trainer.optimizers[0]
            captured["exp_avg"] = {id(p): opt.state[p]["exp_avg"].clone() for g in opt.param_groups
                                   for p in g["params"] if p in opt.state}
            captured["params"] = {n: p for n, p in pl_module.named_parameters()}

    cont = ContinueFrom(str(ckpt))
    second, model, sizes = _fit((shapes_dir, tmp_path / "b"), 32, 5, [cont, Spy()])  # (warns about `position`)
    assert captured["step"] == 3 and captured["lr_step"] == 3 and second.global_step == 5
    assert sizes == [(32, 32)] * 2                                     # two more steps, at the new resolution
    for name, value in saved["state_dict"].items():
        if name != "position":
            torch.testing.assert_close(captured["weights"][name], value)
    assert captured["weights"]["position"].shape == (1, 3, 32, 32) and captured["weights"]["position"].abs().sum() == 0
    assert cont.report["reinitialised"] == ["position"] and cont.report["step"] == 3
    params = captured["params"]
    saved_state = saved["optimizer_states"][0]["state"]
    order = [p for g in second.optimizers[0].param_groups for p in g["params"]]
    for i, p in enumerate(order):
        if p is params["position"]:
            assert id(p) not in captured["exp_avg"]                      # its moments had another shape
        else:
            torch.testing.assert_close(captured["exp_avg"][id(p)], saved_state[i]["exp_avg"])


def test_continuing_needs_a_max_steps_beyond_the_checkpoint(shapes_dir, tmp_path):
    first, _, _ = _fit((shapes_dir, tmp_path / "a"), 16, 3)
    first.save_checkpoint(tmp_path / "s1.ckpt")
    with pytest.raises(UsageError, match="max_steps counts the whole run"):
        _fit((shapes_dir, tmp_path / "b"), 32, 3, [ContinueFrom(str(tmp_path / "s1.ckpt"))])


def test_the_fit_command_takes_continue_from(tmp_path):
    from ldm.cli.train import pop_continue_from

    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    assert pop_continue_from(["fit", "--continue-from", str(ckpt), "--trainer.max_steps", "9"]) == (
        ["fit", "--trainer.max_steps", "9"], str(ckpt))
    assert pop_continue_from(["fit", f"--continue-from={ckpt}"]) == (["fit"], str(ckpt))
    with pytest.raises(UsageError, match="no such checkpoint"):
        pop_continue_from(["fit", "--continue-from", str(tmp_path / "nope.ckpt")])
