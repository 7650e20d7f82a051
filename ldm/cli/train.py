"""``ldm fit`` / ``ldm validate``: LightningCLI in subclass mode over any ldm model and datamodule.

Every model/data/trainer option is settable from YAML (``class_path``/``init_args``) or the command
line (``--model.init_args.lr 1e-3``, ``--trainer.max_steps 100``). A ``--config`` that is not a file here
is looked up among the configs shipped with the package (``--config vae/shapes.yaml`` works after any
install). The trainer defaults ``ldm/configs/trainer/cpu.yaml`` are read first (``$LDM_TRAINER_CONFIG``
names another file; empty: none), so a model config only states what differs.

The fault-tolerance pieces do not depend on any file: :data:`ROBUSTNESS` (atomic checkpoints, preemption
checkpoint, NaN guard, per-step seeds, time-budget planning) is added to every trainer whose config does
not already have one of the same class, and ``ldm fit`` prints which are on. Run outputs go to
``trainer.default_root_dir``: TensorBoard + CSV logs in ``version_N/``, checkpoints in ``checkpoints/``
(``last.ckpt`` + the best by ``val/loss``), so ``--ckpt_path last`` resumes.

``ldm fit --export-to DIR`` exports the final ``last.ckpt`` as a part when the fit ends (``ldm export`` in the
same process: one start-up fewer).

``ldm fit --end-by WHEN`` (epoch seconds or an ISO 8601 time) ends training, and its LR schedule, by that time of
day: unlike ``trainer.max_time``, which counts from the start of training, the process's start-up and set-up
come out of it (a scheduler's wall-clock limit; ``make demo``'s budget).

``ldm fit --continue-from CKPT`` starts a new stage of a run (another resolution, another cache) from the
previous stage's checkpoint: weights, optimizer state, LR-schedule step and step count carry over where shapes
match (:class:`ldm.training.ContinueFrom`); ``trainer.max_steps`` then counts the whole run.

Parse errors (a missing config file, an unknown key, a bad value) are :class:`~ldm.errors.UsageError`:
one line on stderr through ``ldm.cli.main``.
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from ldm.cli import checks
from ldm.errors import UsageError
from ldm.training import (
    AtomicCheckpointIO,
    FinalCheckpoint,
    FitToTimeBudget,
    PreemptionCheckpoint,
    SeedEveryStep,
    SkipNonFiniteSteps,
)

CONFIG_ROOT = Path(str(resources.files("ldm") / "configs"))   # ldm/configs, shipped as package data
DEFAULT_TRAINER_CONFIG = CONFIG_ROOT / "trainer" / "cpu.yaml"
TRAINER_CONFIG_ENV = "LDM_TRAINER_CONFIG"

# The fault tolerance every `ldm fit` gets (name shown in the "on:" line, class, factory with its defaults).
ROBUSTNESS_CALLBACKS: list[tuple[str, type[Callback], Callable[[], Callback]]] = [
    ("per-step seeds", SeedEveryStep, SeedEveryStep),
    ("preemption checkpoint", PreemptionCheckpoint, PreemptionCheckpoint),
    ("final last.ckpt", FinalCheckpoint, FinalCheckpoint),
    ("NaN guard", SkipNonFiniteSteps, SkipNonFiniteSteps),
    ("time-budget planning", FitToTimeBudget, FitToTimeBudget),
]


def resolve_config(name: str | os.PathLike) -> Path:
    """``name`` if it is a file here, else the packaged config of that name (``vae/shapes.yaml`` or
    ``configs/vae/shapes.yaml``); unchanged when neither exists (the parser then names it)."""
    path = Path(name)
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    packaged = CONFIG_ROOT.joinpath(*parts) if parts else CONFIG_ROOT
    return packaged if packaged.is_file() else path


def checked_config(name: str) -> str:
    """:func:`resolve_config` of a ``--config`` value, checked to be a readable YAML file (an inline YAML
    string, which LightningCLI also accepts, passes unchanged)."""
    import yaml

    if "\n" in name or name.lstrip().startswith("{"):
        return name
    path = resolve_config(name)
    if not path.is_file():
        raise UsageError(f"--config {name}: no such file (nor a config shipped with ldm, e.g. vae/shapes.yaml)")
    try:
        yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise UsageError(f"--config {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    return str(path)


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config X`` / ``--config=X`` / ``-c X`` resolved and checked (:func:`checked_config`)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out += [arg, checked_config(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + checked_config(arg.partition("=")[2])
        out.append(arg)
        i += 1
    return out


def default_config_files() -> list[str]:
    """The trainer defaults: ``$LDM_TRAINER_CONFIG`` (empty: none) if set, else the packaged trainer/cpu.yaml.

    A named file that does not exist is an error, not silently skipped."""
    name = os.environ.get(TRAINER_CONFIG_ENV)
    if name is None:
        return [str(DEFAULT_TRAINER_CONFIG)] if DEFAULT_TRAINER_CONFIG.is_file() else []
    if not name.strip():
        return []
    path = resolve_config(name)
    if not path.is_file():
        raise UsageError(f"{TRAINER_CONFIG_ENV}={name}: no such file (nor a packaged config of that name, e.g. "
                         f"trainer/cpu.yaml); unset it for the default trainer config or set it empty for none")
    return [str(path)]


def run_dirs(root: str | os.PathLike) -> tuple[list[pl.loggers.Logger], Path]:
    """TensorBoard + CSV loggers sharing one ``version_N`` under ``root``, and the checkpoint folder."""
    tb = TensorBoardLogger(save_dir=str(root), name="", default_hp_metric=False)
    csv = CSVLogger(save_dir=str(root), name="", version=tb.version)
    return [tb, csv], Path(root) / "checkpoints"


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def add_robustness(callbacks: Any, plugins: Any) -> tuple[list[Any], list[Any], list[str]]:
    """``callbacks`` and ``plugins`` with every :data:`ROBUSTNESS_CALLBACKS` entry and
    :class:`AtomicCheckpointIO` added unless one of the same class is there already (the config's own, with
    its arguments, is kept). A config with another CheckpointIO keeps it and gets no atomic writes.
    Returns (callbacks, plugins, names of the pieces that are on)."""
    callbacks, plugins, on = _as_list(callbacks), _as_list(plugins), []
    io = [p for p in plugins if isinstance(p, CheckpointIO)]
    if not io:
        plugins.append(AtomicCheckpointIO())
    if not io or isinstance(io[0], AtomicCheckpointIO):
        on.append("atomic checkpoints")
    for name, cls, make in ROBUSTNESS_CALLBACKS:
        if not any(isinstance(cb, cls) for cb in callbacks):
            callbacks.append(make())
        on.append(name)
    return callbacks, plugins, on


@rank_zero_only
def _announce(on: list[str]) -> None:
    print(f"ldm fit: on: {', '.join(on)}", flush=True)


def pop_flag(argv: list[str], flag: str, example: str) -> tuple[list[str], str | None]:
    """``argv`` without ``FLAG X`` / ``FLAG=X``, and X (None when absent)."""
    out, found, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == flag:
            if i + 1 >= len(argv):
                raise UsageError(f"{flag} needs a value (e.g. {example})")
            found, i = argv[i + 1], i + 2
            continue
        if arg.startswith(flag + "="):
            found = arg.partition("=")[2]
        else:
            out.append(arg)
        i += 1
    return out, found


def pop_continue_from(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--continue-from X`` / ``--continue-from=X``, and X (None when absent)."""
    out, found = pop_flag(argv, "--continue-from", "checkpoints/shapes/ldm/checkpoints/last.ckpt")
    if found is not None and not Path(found).is_file():
        raise UsageError(f"--continue-from {found}: no such checkpoint file")
    return out, found


def pop_end_by(argv: list[str]) -> tuple[list[str], float | None]:
    """``argv`` without ``--end-by WHEN``, and WHEN as epoch seconds (None when absent). WHEN is epoch seconds
    (``date +%s``) or an ISO 8601 time (``2026-12-07T04:30:00``; local time unless it names a zone)."""
    out, found = pop_flag(argv, "--end-by", "$(date -d '+30 min' +%s) or 2026-12-07T04:30:00")
    if found is None:
        return out, None
    try:
        when = float(found)
    except ValueError:
        try:
            when = datetime.datetime.fromisoformat(found).timestamp()
        except ValueError:
            raise UsageError(f"--end-by {found}: not epoch seconds or an ISO 8601 time "
                             "(e.g. 1796963400 or 2026-12-07T04:30:00)") from None
    if "LOCAL_RANK" not in os.environ and when <= time.time():  # the launching process (a DDP child re-parses)
        raise UsageError(f"--end-by {found}: that time has passed "
                         f"({datetime.datetime.fromtimestamp(when).isoformat(timespec='seconds')})")
    return out, when


class LDMCLI(LightningCLI):
    """LightningCLI whose loggers and checkpoint folder live under ``default_root_dir`` and whose trainer
    always has the fault-tolerance callbacks and atomic checkpoint IO (:func:`add_robustness`); ``end_by``
    (``--end-by``) is the time-budget planner's deadline."""

    continue_from: str | None = None
    end_by: float | None = None

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or os.getcwd()
        loggers, ckpt_dir = run_dirs(root)
        if config.get("logger") in (None, True):
            kwargs["logger"] = loggers
        for cb in config.get("callbacks") or []:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(ckpt_dir)
        kwargs["callbacks"], kwargs["plugins"], on = add_robustness(config.get("callbacks"), config.get("plugins"))
        if self.end_by is not None:
            budget = next(cb for cb in kwargs["callbacks"] if isinstance(cb, FitToTimeBudget))
            budget.deadline = self.end_by
            clock = datetime.datetime.fromtimestamp(self.end_by).isoformat(sep=" ", timespec="seconds")
            on[on.index("time-budget planning")] = f"time-budget planning (training ends by {clock})"
        if self.continue_from and self.subcommand == "fit":
            from ldm.training import ContinueFrom

            kwargs["callbacks"].append(ContinueFrom(self.continue_from))
            on.append(f"continuing {self.continue_from}")
        if self.subcommand == "fit":
            _announce(on)
        return super().instantiate_trainer(**kwargs)


FIT_EPILOG = ("ldm's own flags of `ldm fit`, anywhere on the line. --export-to DIR: export the final last.ckpt "
              "as a part to DIR when the fit ends (`ldm export` in the same process). --end-by WHEN: end training, "
              "and its LR schedule, by WHEN, epoch seconds or an ISO 8601 time (2026-12-07T04:30:00, local time); "
              "unlike --trainer.max_time, the start-up counts. --continue-from CKPT: start a new stage of a run from "
              "CKPT (weights, optimizer, LR step, where shapes match).")


def build_cli(argv: list[str]) -> LDMCLI:
    """Parse ``argv`` (starting with ``fit``/``validate``), build the model, data and trainer, and run it."""
    from jsonargparse import ArgumentError
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    argv, LDMCLI.continue_from = pop_continue_from(resolve_config_args(argv))
    defaults = default_config_files()
    # `ldm` hands LightningCLI its own command line as `args`, which Lightning warns about when sys.argv is set too
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    sub_kwargs = {"default_config_files": defaults, "exit_on_error": False}
    fit_kwargs = {**sub_kwargs, "epilog": FIT_EPILOG}
    try:
        return LDMCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            parser_kwargs={"exit_on_error": False, "fit": fit_kwargs, "validate": dict(sub_kwargs)},
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
        )
    except ArgumentError as e:
        raise UsageError(str(e)) from e
    except MisconfigurationException as e:  # Lightning's verdict on a setting (a bad trainer.max_time, ...)
        raise UsageError(str(e)) from e


def run_lightning(argv: list[str]) -> int:
    """Run ``fit``/``validate`` with LightningCLI; ``argv`` starts with the subcommand. ``--export-to DIR`` (fit
    only): rank 0 exports the final ``last.ckpt`` to DIR once the fit has ended. ``--end-by WHEN`` (fit only):
    training (with its LR schedule) ends by that time of day (:class:`ldm.training.FitToTimeBudget`)."""
    argv, export_to = pop_flag(argv, "--export-to", "checkpoints/shapes/parts/vae")
    argv, LDMCLI.end_by = pop_end_by(argv)
    for flag, value in (("--export-to", export_to), ("--end-by", LDMCLI.end_by)):
        if value is not None and argv[:1] != ["fit"]:
            raise UsageError(f"{flag} is a flag of `ldm fit`")
    if export_to is not None:
        checks.output_dir("--export-to", export_to)
    cli = build_cli(argv)
    if export_to is not None and cli.trainer.is_global_zero:
        import torch.distributed

        from ldm.cli.export import export_checkpoint
        from ldm.training.checkpoint_io import resume_checkpoint_path

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the other ranks have left: export as `ldm export` would
        last = resume_checkpoint_path(cli.trainer)
        if not last.is_file():
            raise UsageError(f"--export-to {export_to}: the fit left no {last} to export")
        export_checkpoint(last, export_to)
    return 0
