"""The `ldm` entry point: help for every command, and `ldm fit` (LightningCLI) of a tiny model on shapes shards."""

from __future__ import annotations

import argparse
import csv

import pytest

from ldm.cli import COMMANDS, main as ldm_main
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
