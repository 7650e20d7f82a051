"""The `ldm` entry point: help for every command, and `ldm fit` (LightningCLI) of a tiny model on shapes shards."""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import pytest

from ldm.cli import COMMANDS
from ldm.cli import main as ldm_main
from ldm.io import load_checkpoint


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        ldm_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", [n for n in COMMANDS if n not in ("fit", "validate")])
def test_every_command_explains_every_flag(name, capsys):
    with pytest.raises(SystemExit) as exc:
        ldm_main([name, "--help"])
    assert exc.value.code == 0
    from ldm.cli import build_parser

    def check(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    check(sub, f"{path} {sub_name}")
            elif action.dest != "help":
                assert action.help, f"`{path} {action.option_strings or action.dest}` has no help text"

    check(build_parser()._subparsers._group_actions[0].choices[name], f"ldm {name}")


def fit_args(root, shapes_dir, *extra):
    return ["fit", "--model", "tiny_model.TinyImageModel", "--data", "ldm.data.webdata.WebDataModule",
            "--data.data_dir", str(shapes_dir), "--data.batch_size", "16", "--data.num_workers", "0",
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1", *extra]


def test_fit_writes_logs_and_checkpoints_and_resumes(tmp_path, shapes_dir):
    root = tmp_path / "run"
    assert ldm_main(fit_args(root, shapes_dir)) == 0
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_file() and list((root / "checkpoints").glob("best-*.ckpt"))
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == 4
    assert ckpt["ldm_class_path"] == "tiny_model.TinyImageModel"
    assert ckpt["ldm_datamodule"]["init_args"]["data_dir"] == str(shapes_dir)
    rows = list(csv.DictReader(open(root / "version_0" / "metrics.csv")))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    assert list((root / "version_0").glob("events.out.tfevents.*"))
    assert (root / "version_0" / "config.yaml").is_file()

    # resume from last.ckpt: the step count continues
    assert ldm_main(fit_args(root, shapes_dir, "--trainer.max_steps", "6", "--ckpt_path", str(last))) == 0
    assert load_checkpoint(last)["global_step"] == 6
    assert (root / "version_1").is_dir()


def test_fit_with_a_bad_data_dir_names_it(tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        ldm_main(fit_args(tmp_path / "run", tmp_path / "nowhere"))


# ---- robustness defaults live in the code, configs resolve from the package --------------------------------
ROBUST = ("AtomicCheckpointIO", "SeedEveryStep", "PreemptionCheckpoint", "FinalCheckpoint", "SkipNonFiniteSteps",
          "FitToTimeBudget")


def test_fit_without_a_trainer_config_still_has_every_fault_tolerance_piece(tmp_path, shapes_dir, monkeypatch, capsys):
    from ldm.cli.train import build_cli
    from ldm.training import (
        AtomicCheckpointIO,
        FinalCheckpoint,
        FitToTimeBudget,
        PreemptionCheckpoint,
        SeedEveryStep,
        SkipNonFiniteSteps,
    )

    saved = []
    original = AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        saved.append(path)
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    monkeypatch.setenv("LDM_TRAINER_CONFIG", "")  # no trainer config at all
    cli = build_cli(fit_args(tmp_path / "run", shapes_dir))
    callbacks = cli.trainer.callbacks
    for cls in (SeedEveryStep, PreemptionCheckpoint, FinalCheckpoint, SkipNonFiniteSteps, FitToTimeBudget):
        assert sum(isinstance(cb, cls) for cb in callbacks) == 1, cls
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert saved and all(str(p).endswith(".ckpt") for p in saved) and os.path.isfile(saved[-1])
    assert ("ldm fit: on: atomic checkpoints, per-step seeds, preemption checkpoint, final last.ckpt, NaN guard, "
            "time-budget planning") in capsys.readouterr().out


def test_a_config_that_lists_a_piece_keeps_its_own_and_gets_no_second(tmp_path, shapes_dir):
    from ldm.cli.train import add_robustness, build_cli
    from ldm.training import AtomicCheckpointIO, SkipNonFiniteSteps

    config = tmp_path / "guard.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: ldm.training.SkipNonFiniteSteps\n"
                      "      init_args:\n        max_consecutive: 5\n")
    cli = build_cli(fit_args(tmp_path / "run", shapes_dir, "--config", str(config)))
    guards = [cb for cb in cli.trainer.callbacks if isinstance(cb, SkipNonFiniteSteps)]
    assert len(guards) == 1 and guards[0].max_consecutive == 5
    # plugins: the config's own AtomicCheckpointIO is kept; another CheckpointIO is kept and gets no atomic writes
    own = AtomicCheckpointIO()
    _, plugins, on = add_robustness(None, [own])
    assert plugins == [own] and "atomic checkpoints" in on
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    other = TorchCheckpointIO()
    _, plugins, on = add_robustness([], other)
    assert plugins == [other] and "atomic checkpoints" not in on


def test_the_default_trainer_config_has_none_of_the_robustness_classes():
    from ldm.cli.train import DEFAULT_TRAINER_CONFIG

    text = DEFAULT_TRAINER_CONFIG.read_text()
    assert "ModelCheckpoint" in text and not [name for name in ROBUST if f"ldm.training.{name}" in text]


def test_a_config_name_resolves_to_the_packaged_config_from_any_folder(tmp_path, monkeypatch):
    from ldm.cli.train import CONFIG_ROOT, resolve_config, resolve_config_args

    monkeypatch.chdir(tmp_path)
    packaged = CONFIG_ROOT / "vae" / "shapes.yaml"
    assert packaged.is_file()
    assert resolve_config("vae/shapes.yaml") == packaged == resolve_config("configs/vae/shapes.yaml")
    assert resolve_config("vae/nope.yaml") == Path("vae/nope.yaml")  # left for the parser to name
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "shapes.yaml").write_text("trainer: {}\n")
    assert resolve_config("vae/shapes.yaml") == Path("vae/shapes.yaml")  # a local file wins
    assert resolve_config_args(["fit", "--config=ldm/shapes.yaml", "-c", "trainer/ddp-cpu.yaml", "--x", "y"]) == [
        "fit", f"--config={CONFIG_ROOT / 'ldm' / 'shapes.yaml'}", "-c", str(CONFIG_ROOT / "trainer" / "ddp-cpu.yaml"),
        "--x", "y"]


def test_fit_reads_a_packaged_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        ldm_main(["fit", "--config", "vae/shapes.yaml", "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "ldm.models.autoencoder.AutoencoderModule" in out and "default_root_dir: checkpoints/shapes/vae" in out


def test_no_module_finds_configs_relative_to_its_own_file():
    root = Path(__file__).resolve().parents[1] / "ldm"
    offenders = [str(p) for p in root.rglob("*.py") if "parents[2]" in p.read_text()
                 or ("parents[1]" in p.read_text() and "configs" in p.read_text())]
    assert offenders == []


def test_end_by_gives_the_time_budget_planner_its_deadline(tmp_path, shapes_dir, capsys, monkeypatch):
    import datetime
    import time

    from ldm.training import FitToTimeBudget

    when = int(time.time()) + 600
    seen = []
    original = FitToTimeBudget.on_train_start

    def recording(self, trainer, pl_module):
        seen.append(self.deadline)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(FitToTimeBudget, "on_train_start", recording)
    assert ldm_main(fit_args(tmp_path / "run", shapes_dir, "--end-by", str(when))) == 0
    assert seen == [when]
    clock = datetime.datetime.fromtimestamp(when).isoformat(sep=" ", timespec="seconds")
    assert f"time-budget planning (training ends by {clock})" in capsys.readouterr().out
