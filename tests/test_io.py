"""Exported parts: round trip, strict loading with clear errors, safe checkpoint loading."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from ldm.io import PartError, load_checkpoint, load_part, save_part


@dataclasses.dataclass
class TinyConfig:
    width: int = 3
    scale: float = 2.0


class TinyPart(nn.Module):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.lin = nn.Linear(config.width, config.width)
        self.register_buffer("offset", torch.arange(config.width, dtype=torch.float32))

    def forward(self, x):
        return self.lin(x) * self.config.scale + self.offset


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    part = TinyPart(TinyConfig(width=4, scale=0.5))
    save_part(part, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["_class_name"] == "TinyPart" and cfg["width"] == 4 and cfg["scale"] == 0.5
    loaded = load_part(tmp_path / "p", TinyPart)
    assert not loaded.training
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), part(x))


def test_missing_folder_and_files_name_the_path(tmp_path):
    with pytest.raises(PartError, match="does not exist"):
        load_part(tmp_path / "nope", TinyPart)
    save_part(TinyPart(TinyConfig()), tmp_path / "p")
    (tmp_path / "p" / "model.safetensors").unlink()
    with pytest.raises(PartError, match="model.safetensors"):
        load_part(tmp_path / "p", TinyPart)


def test_mismatched_weights_list_the_keys(tmp_path):
    save_part(TinyPart(TinyConfig(width=3)), tmp_path / "p")
    cfg_path = tmp_path / "p" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["width"] = 5
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PartError, match=r"shape mismatch: lin.bias \(3,\)≠\(5,\), lin.weight \(3, 3\)≠\(5, 5\)"):
        load_part(tmp_path / "p", TinyPart)


def test_unknown_config_key_is_an_error(tmp_path):
    save_part(TinyPart(TinyConfig()), tmp_path / "p")
    cfg_path = tmp_path / "p" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["depth"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PartError, match=r"unknown keys \['depth'\]"):
        load_part(tmp_path / "p", TinyPart)


def test_class_outside_ldm_is_refused(tmp_path):
    save_part(TinyPart(TinyConfig()), tmp_path / "p")  # this test module is not inside ldm.*
    with pytest.raises(PartError, match="only ldm"):
        load_part(tmp_path / "p")


def test_checkpoint_loading_is_weights_only(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, good)
    assert load_checkpoint(good)["global_step"] == 3

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, bad)
    with pytest.raises(PartError, match="weights_only=True"):
        load_checkpoint(bad)
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(good.read_bytes()[:50])
    with pytest.raises(PartError, match="trunc.ckpt"):
        load_checkpoint(truncated)
    with pytest.raises(PartError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
