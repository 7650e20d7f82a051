"""``ldm fit`` / ``ldm validate``: LightningCLI in subclass mode over any ldm model and datamodule.

Every model/data/trainer option is settable from YAML (``class_path``/``init_args``) or the command
line (``--model.init_args.lr 1e-3``, ``--trainer.max_steps 100``). ``configs/trainer/cpu.yaml`` is read
first when it exists, so a model config only states what differs. Run outputs go to
``trainer.default_root_dir``: TensorBoard + CSV logs in ``version_N/``, checkpoints in
``checkpoints/`` (``last.ckpt`` + the best by ``val/loss``), so ``--ckpt_path last`` resumes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"   # ldm/configs, shipped as package data
DEFAULT_TRAINER_CONFIG = CONFIG_ROOT / "trainer" / "cpu.yaml"


def default_config_files() -> list[str]:
    """The trainer defaults: ``$LDM_TRAINER_CONFIG`` if set, else the repo's configs/trainer/cpu.yaml."""
    path = os.environ.get("LDM_TRAINER_CONFIG", str(DEFAULT_TRAINER_CONFIG))
    return [path] if path and Path(path).is_file() else []


def run_dirs(root: str | os.PathLike) -> tuple[list[pl.loggers.Logger], Path]:
    """TensorBoard + CSV loggers sharing one ``version_N`` under ``root``, and the checkpoint folder."""
    tb = TensorBoardLogger(save_dir=str(root), name="", default_hp_metric=False)
    csv = CSVLogger(save_dir=str(root), name="", version=tb.version)
    return [tb, csv], Path(root) / "checkpoints"


class LDMCLI(LightningCLI):
    """LightningCLI whose default loggers and checkpoint folder live under ``default_root_dir``."""

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or os.getcwd()
        loggers, ckpt_dir = run_dirs(root)
        if config.get("logger") in (None, True):
            kwargs["logger"] = loggers
        for cb in config.get("callbacks") or []:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(ckpt_dir)
        return super().instantiate_trainer(**kwargs)


def run_lightning(argv: list[str]) -> int:
    """Run ``fit``/``validate`` with LightningCLI; ``argv`` starts with the subcommand."""
    LDMCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        parser_kwargs={sub: {"default_config_files": default_config_files()} for sub in ("fit", "validate")},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )
    return 0
