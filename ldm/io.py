"""Exported parts and checkpoints: the contract between the trainings, and the trust boundary of every file.

An *exported part* is a folder with

* ``config.json``       -- ``{"_class_name", "_ldm_version", "_weights_sha256", **asdict(module.config)}``
  (+ provenance such as ``"_trained_with"`` on a denoiser: the hashes of the VAE and text encoder beside it)
* ``model.safetensors`` -- the module's ``state_dict`` (no pickle anywhere).

Any ``nn.Module`` whose constructor takes a single dataclass ``config`` (nanoGPT style, ``Module(config)``),
stores it as ``self.config`` and names its dataclass in ``config_class`` can be saved here; loading by name
only builds classes registered in ``ldm.registry``, with config values checked against the dataclass's types.
Lightning ``.ckpt`` files are read with ``weights_only=True`` only. Every write is atomic (:func:`atomic_write`).
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from ldm import __version__
from ldm.errors import LdmError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HASH_KEY = "_weights_sha256"
M = TypeVar("M", bound=torch.nn.Module)


class PartError(LdmError, RuntimeError):
    """An exported part or checkpoint is missing, unreadable or does not match its module."""


class ConfigError(PartError, ValueError):
    """A config (a part's config.json, a YAML block) names unknown fields or values of the wrong type."""


class CheckpointLoadError(PartError):
    """A training checkpoint is missing, truncated, corrupt or not a Lightning checkpoint."""


# ---- atomic files -----------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(temp_path)`` into a temp file beside it, fsync, then ``os.replace``.

    A crash, SIGKILL or full disk mid-write leaves the previous file intact, never half a file. On any error
    (KeyboardInterrupt included) the temp file is removed. The one atomic-write helper of the project.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:  # not every filesystem lets a directory be opened/fsync'ed
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_folder(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Fill a fresh folder beside ``path`` through ``write(temp_folder)``, then swap it in whole: a failed
    write leaves an older ``path`` as it was, and never a folder mixing two writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new-"))
    try:
        write(work)
        old = path.parent / f".{path.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        work.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, pretty-printed and key-sorted so configs diff cleanly."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PartError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PartError(f"{path} is not valid JSON: {e}") from e


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---- configs: dataclass <-> JSON, values checked against the field types -------------------------------
def module_config(module: torch.nn.Module) -> dict[str, Any]:
    """The JSON-able constructor config of a part (its ``config`` dataclass as a dict)."""
    cfg = getattr(module, "config", None)
    if not dataclasses.is_dataclass(cfg):
        raise PartError(f"{type(module).__name__} has no dataclass `config`; it cannot be exported as a part")
    return dataclasses.asdict(cfg)


def matches_type(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a type annotation (None/bool/int/float/str, lists/tuples/dicts of them,
    unions, Literal, Any). Ints are accepted for floats; bools are not accepted for numbers."""
    if annotation is Any or annotation is typing.Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches_type(v, a) for v, a in zip(value, args))
        return not args or all(matches_type(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict) and (not args or all(isinstance(k, str) and matches_type(v, args[1])
                                                            for k, v in value.items()))
    if annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this checker does not model: leave it to the constructor


def config_from_dict(config_class: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build a config dataclass from a dict, ignoring reserved ``_`` keys; unknown keys and values of the
    wrong type are errors naming ``source``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of {config_class.__name__} fields, "
                          f"got {type(values).__name__}")
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved here: the constructor checks it
        hints = {}
    fields = {f.name for f in dataclasses.fields(config_class)}
    clean = {k: v for k, v in values.items() if not str(k).startswith("_")}
    unknown = sorted(set(clean) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown} for {config_class.__name__} (expected {sorted(fields)})")
    wrong = [f"{k}={v!r} (expected {getattr(hints[k], '__name__', hints[k])})" for k, v in clean.items()
             if k in hints and not matches_type(v, hints[k])]
    if wrong:
        raise ConfigError(f"{source}: wrong type for {', '.join(wrong)}")
    try:
        return config_class(**clean)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from e


# ---- parts --------------------------------------------------------------------------------------------
def weights_hash(module: torch.nn.Module) -> str | None:
    """The content hash of the weights file a part was loaded from or last saved to (None if neither)."""
    return getattr(module, "_ldm_weights_sha256", None)


def save_part(module: torch.nn.Module, out_dir: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Export ``module`` to ``out_dir`` as config.json + model.safetensors; returns the folder.

    The weights' sha256 is recorded in config.json (and kept on the module, see :func:`weights_hash`);
    ``metadata`` adds ``_``-prefixed provenance keys (e.g. ``{"_trained_with": {...}}``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu().clone() for k, v in module.state_dict().items()}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    digest = file_sha256(out / WEIGHTS_NAME)
    extra = {k if k.startswith("_") else f"_{k}": v for k, v in (metadata or {}).items()}
    write_json(out / CONFIG_NAME, {"_class_name": type(module).__name__, "_ldm_version": __version__,
                                   HASH_KEY: digest, **extra, **module_config(module)})
    module._ldm_weights_sha256 = digest
    return out


def part_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``_``-prefixed keys of a part's config.json (class name, version, hashes, provenance)."""
    return {k: v for k, v in read_json(Path(path) / CONFIG_NAME).items() if k.startswith("_")}


def load_part(path: str | os.PathLike, cls: type[M] | None = None, map_location: str | torch.device = "cpu",
              kind: str | None = None, verify: bool = True, meta_init: bool = False) -> M:
    """Rebuild an exported part from ``path`` and load its weights strictly; returned in eval mode.

    ``cls`` defaults to the class config.json names, looked up in ``ldm.registry`` (``kind``, e.g. "vae" or
    "denoiser", is checked when given). With ``verify`` the weights must match the recorded sha256.
    ``meta_init``: build the module on the meta device and adopt the file's tensors as they are (their dtype,
    no copy, no random init): for conversions that only read and write weights; buffers that are not in the
    file stay on the meta device, so such a module cannot run.
    """
    from ldm.registry import part_class

    path = Path(path)
    if not path.is_dir():
        raise PartError(f"exported part folder {path} does not exist")
    weights = path / WEIGHTS_NAME
    config = read_json(path / CONFIG_NAME)
    if not isinstance(config, dict):
        raise PartError(f"{path / CONFIG_NAME} is not a JSON object")
    if not weights.is_file():
        raise PartError(f"missing weights {weights} (expected {WEIGHTS_NAME} beside {CONFIG_NAME})")
    if cls is None:
        name = config.get("_class_name")
        if not isinstance(name, str):
            raise PartError(f"{path / CONFIG_NAME} names no _class_name; pass the class explicitly")
        cls = part_class(name, kind, str(path / CONFIG_NAME))
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        raise PartError(f"{cls.__name__} has no `config_class`; it cannot be loaded as a part")
    digest = file_sha256(weights) if verify or config.get(HASH_KEY) else None
    if verify and config.get(HASH_KEY) and digest != config[HASH_KEY]:
        raise PartError(f"{weights} does not match the sha256 recorded in {path / CONFIG_NAME}: the file was changed, "
                        "truncated or swapped; export the part again")
    part_config = config_from_dict(config_class, config, str(path / CONFIG_NAME))
    with torch.device("meta") if meta_init else contextlib.nullcontext():
        module = cls(part_config)
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise PartError(f"cannot read {weights}: {e} (truncated or not a safetensors file?)") from e
    load_state_dict_checked(module, state, str(weights), assign=meta_init)
    module._ldm_weights_sha256 = digest
    return module.eval()


def load_state_dict_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                            assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the mismatched keys (``assign``:
    adopt the tensors instead of copying into the module's, e.g. into a module built on the meta device)."""
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
            problems.append("shape mismatch: "
                            + head([f"{k} {tuple(state[k].shape)}≠{tuple(expected[k].shape)}" for k in shapes]))
        raise PartError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True, assign=assign)


# ---- torch files, read weights-only ----------------------------------------------------------------
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


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    require: tuple[str, ...] = ("state_dict",)) -> dict[str, Any]:
    """Load a Lightning ``.ckpt`` with ``weights_only=True``; any failure names the file and the way out.

    The one checkpoint loader: ``ldm export``, evaluation and resume (``AtomicCheckpointIO``) all read here."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"checkpoint {path} does not exist; check --ckpt_path (or drop it to start afresh)")
    try:
        checkpoint = torch_load_safely(path, "checkpoint", map_location)
    except PartError as e:
        raise CheckpointLoadError(
            f"{e} ({path.stat().st_size} bytes). The file is truncated or corrupt, or holds objects other than "
            f"tensors and plain values. Resume from another checkpoint in {path.parent} (--ckpt_path FILE) or "
            "start afresh without --ckpt_path.") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointLoadError(f"{path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict")
    missing = [k for k in require if k not in checkpoint]
    if missing:
        raise CheckpointLoadError(f"{path} is not a resumable Lightning checkpoint: it has no {missing} "
                                  f"(keys: {sorted(checkpoint)[:12]})")
    return checkpoint
