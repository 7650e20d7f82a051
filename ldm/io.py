"""Exported parts and checkpoints: the contract between the three trainings.

An *exported part* is a folder with

* ``config.json``       -- ``{"_class_name", "_module", "_ldm_version", **asdict(module.config)}``
* ``model.safetensors`` -- the module's ``state_dict`` (no pickle anywhere).

Any ``nn.Module`` whose constructor takes a single dataclass ``config`` (nanoGPT style,
``Module(config)``), stores it as ``self.config`` and names its dataclass in the class
attribute ``config_class`` can be saved and loaded here. Lightning ``.ckpt`` files are read with
``weights_only=True`` only.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm import __version__
from ldm.errors import LdmError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_RESERVED = ("_class_name", "_module", "_ldm_version")

M = TypeVar("M", bound=torch.nn.Module)


class PartError(LdmError, RuntimeError):
    """An exported part or checkpoint is missing, unreadable or does not match its module."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, pretty-printed and key-sorted so configs diff cleanly."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PartError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PartError(f"{path} is not valid JSON: {e}") from e


def module_config(module: torch.nn.Module) -> dict[str, Any]:
    """The JSON-able constructor config of a part (its ``config`` dataclass as a dict)."""
    cfg = getattr(module, "config", None)
    if not dataclasses.is_dataclass(cfg):
        raise PartError(f"{type(module).__name__} has no dataclass `config`; it cannot be exported as a part")
    return dataclasses.asdict(cfg)


def save_part(module: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Export ``module`` to ``out_dir`` as config.json + model.safetensors; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": type(module).__name__, "_module": type(module).__module__,
              "_ldm_version": __version__, **module_config(module)}
    state = {k: v.detach().contiguous().cpu().clone() for k, v in module.state_dict().items()}
    tmp = out / f".{WEIGHTS_NAME}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_NAME)
    write_json(out / CONFIG_NAME, config)
    return out


def _resolve_class(config: dict[str, Any], path: Path) -> type[torch.nn.Module]:
    module_name, class_name = config.get("_module"), config.get("_class_name")
    if not module_name or not class_name:
        raise PartError(f"{path / CONFIG_NAME} names no _module/_class_name; pass the class explicitly")
    if not (module_name == "ldm" or module_name.startswith("ldm.")):
        raise PartError(f"{path / CONFIG_NAME} names class {module_name}.{class_name}; only ldm.* classes are loaded")
    return getattr(importlib.import_module(module_name), class_name)


def config_from_dict(config_class: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build a config dataclass from a dict, ignoring reserved ``_`` keys; unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    clean = {k: v for k, v in values.items() if k not in _RESERVED}
    unknown = sorted(set(clean) - fields)
    if unknown:
        raise PartError(f"{source}: unknown keys {unknown} for {config_class.__name__} (expected {sorted(fields)})")
    return config_class(**clean)


def load_part(path: str | os.PathLike, cls: type[M] | None = None, map_location: str | torch.device = "cpu") -> M:
    """Rebuild an exported part from ``path`` and load its weights strictly; returned in eval mode.

    ``cls`` defaults to the class named in config.json (only ``ldm.*`` classes are imported).
    """
    path = Path(path)
    if not path.is_dir():
        raise PartError(f"exported part folder {path} does not exist")
    weights = path / WEIGHTS_NAME
    config = read_json(path / CONFIG_NAME)
    if not weights.is_file():
        raise PartError(f"missing weights {weights} (expected {WEIGHTS_NAME} beside {CONFIG_NAME})")
    cls = cls or _resolve_class(config, path)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        raise PartError(f"{cls.__name__} has no `config_class`; it cannot be loaded as a part")
    module = cls(config_from_dict(config_class, config, str(path / CONFIG_NAME)))
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise PartError(f"{weights} is not a readable safetensors file ({e}); re-export the part") from e
    load_state_dict_checked(module, state, str(weights))
    return module.eval()


def load_state_dict_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the mismatched keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")
        problems = []
        if missing:
            problems.append(f"missing keys: {head(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {head(unexpected)}")
        if shapes:
            problems.append("shape mismatch: " + head([f"{k} {tuple(state[k].shape)}≠{tuple(expected[k].shape)}" for k in shapes]))
        raise PartError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def torch_load_safely(path: str | os.PathLike, what: str = "file", map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; any failure becomes a PartError naming ``what`` and the file.

    The cause is kept without torch's advice to retry with ``weights_only=False`` (never do that on a file
    you did not write)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of a non-allowed type, not a torch file ...
        cause = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?: Please use|\n|$)", str(e))
        reason = (cause.group(1) if cause else (str(e).splitlines() or [type(e).__name__])[0]).rstrip(". ")
        raise PartError(f"cannot load {what} {path} safely (torch.load with weights_only=True): {reason}") from e


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a Lightning ``.ckpt`` safely (``weights_only=True``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise PartError(f"checkpoint {path} does not exist")
    ckpt = torch_load_safely(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise PartError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt
