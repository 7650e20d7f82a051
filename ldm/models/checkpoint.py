"""Rebuild a trained module (and its datamodule) from a training checkpoint, trusting nothing in the file.

A ``.ckpt`` written by a :class:`~ldm.models.base.PartModule` names its LightningModule and datamodule and
holds their constructor arguments. The file may have been crafted, so:

* the classes are looked up in ``ldm.registry.TRAINING`` (never imported from a path the file gives);
* every argument is checked against the constructor's signature (name and type) before anything is built;
* the recorded data source is used only when it is a local folder or file: ``pipe:`` commands and URLs are
  accepted from the command line or a config the user passes, never from a checkpoint (``--data-dir``).

Checkpoints written before the training base's ``optimizer`` / ``lr_schedule`` blocks load through
:func:`upgrade_hparams`.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

from ldm.io import PartError, load_checkpoint, matches_type
from ldm.models.base import CLASS_KEY, DATAMODULE_KEY
from ldm.registry import training_class

# old flat keys -> (block, key inside the block), per module class (checkpoints from before the training base)
_OPTIMIZER_KEYS = {"lr": "lr", "betas": "betas", "weight_decay": "weight_decay", "eps": "eps"}
_LEGACY_SCHEDULE = {
    "LatentDiffusion": {"warmup_steps": "warmup_steps", "min_lr_ratio": "min_lr_ratio"},
    "ContrastiveCLIP": {"warmup_steps": "warmup_steps"},
    "AutoencoderModule": {"warmup_steps": "warmup_steps", "lr_schedule": "decay", "lr_min_ratio": "min_lr_ratio",
                          "lr_decay_steps": "decay_steps"},
}
_LEGACY_RENAMES = {"LatentDiffusion": {"unet": "denoiser", "schedule": "noise_schedule"}}


def is_local_source(source: Any) -> bool:
    """A plain local path (not a ``pipe:`` command, not a URL)."""
    return isinstance(source, str) and not source.startswith("pipe:") and "://" not in source


def upgrade_hparams(class_name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """Map a pre-training-base checkpoint's flat optimizer/schedule arguments into the nested blocks."""
    if "optimizer" in hparams or class_name not in _LEGACY_SCHEDULE:
        return hparams
    out = dict(hparams)
    for old, new in _LEGACY_RENAMES.get(class_name, {}).items():
        if old in out:
            out[new] = out.pop(old)
    optimizer = {new: out.pop(old) for old, new in _OPTIMIZER_KEYS.items() if old in out}
    schedule = {new: out.pop(old) for old, new in _LEGACY_SCHEDULE[class_name].items() if old in out}
    if class_name == "AutoencoderModule" and schedule.get("decay_steps") is None:
        schedule.pop("decay_steps", None)
    if optimizer:
        out["optimizer"] = optimizer
    if schedule:
        out["lr_schedule"] = schedule
    return out


def checked_arguments(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` if every key is a parameter of ``cls.__init__`` and every value fits its annotation."""
    if not isinstance(values, dict):
        raise PartError(f"{source}: arguments of {cls.__name__} are a {type(values).__name__}, not a mapping")
    signature = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: names are still checked
        hints = {}
    params = {n for n, p in signature.parameters.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}
    unknown = sorted(set(values) - params)
    if unknown:
        raise PartError(f"{source}: {cls.__name__} takes no argument(s) {unknown}; re-train, or export with the ldm "
                        "version that wrote the checkpoint")
    wrong = [k for k, v in values.items() if k in hints and not matches_type(v, hints[k])]
    if wrong:
        raise PartError(f"{source}: argument(s) of {cls.__name__} with a value of the wrong type: "
                        + ", ".join(f"{k}={values[k]!r}" for k in wrong))
    return values


def rebuild_from_checkpoint(ckpt_path: str | Path, data_dir: str | None = None) -> tuple[Any, Any, str | None]:
    """(model with the checkpoint's weights, its datamodule or None, a note on the data used or None).

    Everything the file names is resolved and checked before anything is constructed."""
    from ldm.training.sharded import is_sharded_checkpoint, load_sharded_checkpoint

    source = str(ckpt_path)
    ckpt = load_sharded_checkpoint(ckpt_path) if is_sharded_checkpoint(ckpt_path) else load_checkpoint(ckpt_path)
    name = ckpt.get(CLASS_KEY)
    if not isinstance(name, str):
        raise PartError(f"{source} records no model class ({CLASS_KEY}); "
                        "was it written by `ldm fit` with an ldm model?")
    cls = training_class(name, "model", source)
    hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not str(k).startswith("_")}
    hparams = checked_arguments(cls, upgrade_hparams(cls.__name__, hparams), source)
    dm_cls, dm_args, note = None, None, None
    dm_info = ckpt.get(DATAMODULE_KEY)
    if isinstance(dm_info, dict):
        dm_cls = training_class(str(dm_info.get("class_path")), "datamodule", source)
        dm_args = {k: v for k, v in (dm_info.get("init_args") or {}).items() if not str(k).startswith("_")}
        if data_dir is not None:
            dm_args["data_dir"] = data_dir
        elif "data_dir" in dm_args:
            if not is_local_source(dm_args["data_dir"]):
                raise PartError(f"{source} records the data source {dm_args['data_dir']!r}, which is not a local path; "
                                "commands and URLs are never taken from a checkpoint: pass --data-dir")
            note = f"using the data folder recorded in the checkpoint: {dm_args['data_dir']} (--data-dir to change it)"
        checked_arguments(dm_cls, dm_args, source)
    model = cls(**hparams)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise PartError(f"{source}: the weights do not match {cls.__name__} built from its own arguments "
                        f"({str(e).splitlines()[0]})") from e
    datamodule = dm_cls(**dm_args) if dm_cls is not None else None
    return model.eval(), datamodule, note
