"""The classes a file may name: one explicit table per kind, nothing else is ever imported from a file's say-so.

A part's ``config.json`` names its class (``"_class_name": "UNet"``) and a training checkpoint names its
LightningModule and datamodule; :func:`resolve` looks the name up here and refuses anything else, so a
crafted file cannot make ``ldm`` import or call an arbitrary callable (``ldm.io.atomic_write_bytes``, say).
Modules are imported lazily, so this table costs nothing to import.

To add a class (a new denoiser, a new datamodule): one line in the right table.
"""

from __future__ import annotations

import importlib
from typing import Any

from ldm.io import PartError

# exported parts: class name -> (module, kind)
PARTS: dict[str, tuple[str, str]] = {
    "AutoencoderKL": ("ldm.modules.autoencoder", "vae"),
    "IdentityFirstStage": ("ldm.modules.identity_vae", "vae"),
    "CLIPTextConditioner": ("ldm.modules.text_encoder", "text_encoder"),
    "UnconditionalText": ("ldm.modules.null_text", "text_encoder"),
    "CLIPImageEncoder": ("ldm.modules.text_encoder", "image_encoder"),
    "UNet": ("ldm.modules.unet", "denoiser"),
    "DiT": ("ldm.modules.dit", "denoiser"),
    "ShapesProbe": ("ldm.evaluation.shapes_probe", "probe"),
    "PairDetector": ("ldm.evaluation.pair_detector", "probe"),
    "LatentClassifier": ("ldm.modules.latent_classifier", "classifier"),
}

# denoiser spellings in configs (``denoiser: {type: unet, ...}``) -> part class name
DENOISERS: dict[str, str] = {"unet": "UNet", "dit": "DiT"}

# what a training checkpoint may name: LightningModules and datamodules, by class name -> module
TRAINING: dict[str, tuple[str, str]] = {
    "AutoencoderModule": ("ldm.models.autoencoder", "model"),
    "ContrastiveCLIP": ("ldm.models.text_encoder", "model"),
    "LatentDiffusion": ("ldm.models.latent_diffusion", "model"),
    "LatentConsistencyDistillation": ("ldm.models.lcm", "model"),
    "LatentClassifierModule": ("ldm.models.latent_classifier", "model"),
    "WebDataModule": ("ldm.data.webdata", "datamodule"),
    "LatentDataModule": ("ldm.data.latents", "datamodule"),
}


class RegistryError(PartError, ValueError):
    """A file names a class that is not in the registry (or not of the kind expected there)."""


def _lookup(table: dict[str, tuple[str, str]], name: str, kind: str | None, source: str, what: str) -> type:
    short = name.rpartition(".")[2] if isinstance(name, str) else name
    entry = table.get(short) if isinstance(short, str) else None
    # a dotted path must be exactly the registered module + class (old checkpoints record full class paths)
    if entry is None or ("." in name and name != f"{entry[0]}.{short}"):
        allowed = sorted(k for k, (_, kd) in table.items() if kind is None or kd == kind)
        raise RegistryError(f"{source} names {what} class {name!r}, which is not loaded: only ldm's registered "
                            f"classes are (known {kind or what} classes: {allowed})")
    module, registered_kind = entry
    if kind is not None and registered_kind != kind:
        raise RegistryError(f"{source} names {name!r}, a {registered_kind} class, where a {kind} is expected")
    return getattr(importlib.import_module(module), short)


def part_class(name: str, kind: str | None = None, source: str = "a part") -> type:
    """The part class registered as ``name`` (optionally checked to be a ``kind``: vae, denoiser, ...)."""
    return _lookup(PARTS, name, kind, source, "part")


def training_class(name: str, kind: str | None = None, source: str = "a checkpoint") -> type:
    """The LightningModule (``kind="model"``) or datamodule (``kind="datamodule"``) registered as ``name``."""
    return _lookup(TRAINING, name, kind, source, "training")


def denoiser_class(spelling: str, source: str = "the config") -> type:
    """The denoiser class a config names (``unet``, ``dit``; the class name works too)."""
    name = DENOISERS.get(str(spelling).lower(), spelling)
    if name not in PARTS or PARTS[name][1] != "denoiser":
        raise RegistryError(f"{source}: unknown denoiser type {spelling!r}; use one of {sorted(DENOISERS)}")
    return part_class(name, "denoiser", source)


def kind_of(cls_or_obj: Any) -> str | None:
    """The registered kind of a part class or instance (None if it is not registered)."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    entry = PARTS.get(cls.__name__)
    return entry[1] if entry and entry[0] == cls.__module__ else None
