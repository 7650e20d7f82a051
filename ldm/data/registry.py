"""Datasets by name, and the evaluation hooks a dataset's own module may provide (a plug-in benchmark).

``DATASETS`` maps a dataset name (the ``name`` in a dataset's ``info.json``) to the module that builds and
describes it. A module may define ``BENCHMARK``, an instance of :class:`Benchmark`: prompts for validation
grids, zero-shot classification heads and hard-negative word groups for the contrastive text encoder. General
classes (``WebDataModule``, ``LatentDataModule``, ``LatentDiffusion``, ``ContrastiveCLIP``) ask the data
they train on for its benchmark and never assume one: to add a dataset, add a line here and a module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Sequence

import torch

DATASETS: dict[str, str] = {
    "shapes": "ldm.data.shapes",
    "folder": "ldm.data.folder",
    "openmoji": "ldm.data.openmoji",
    "digits": "ldm.data.digits",
}


@dataclass
class ZeroShotPrompts:
    """Prompts covering a label space: ``labels[p, a]`` is prompt p's class index for attribute a."""

    prompts: list[str]
    labels: torch.Tensor
    classes: dict[str, list[str]]


class Benchmark:
    """Evaluation hooks of a dataset; every hook is optional (the defaults say "none")."""

    def val_prompts(self) -> list[str]:
        """A few prompts for the validation sample grid."""
        return []

    def zero_shot_prompts(self) -> ZeroShotPrompts | None:
        """Prompts for zero-shot classification of val images (CLIP sec. 3.1.4)."""
        return None

    def zero_shot_labels(self, metas: Sequence[dict[str, Any]], classes: dict[str, list[str]]) -> torch.Tensor:
        """(B, A) class index of each attribute for the samples' json metadata; −1 where unknown."""
        return torch.full((len(metas), len(classes)), -1, dtype=torch.long)

    def hard_negative_groups(self) -> dict[str, list[str]] | None:
        """Interchangeable words/phrases of the captions (NegCLIP-style hard negatives)."""
        return None

    def adherence_scorer(
        self, data_dir: str, probe_dir: str, train_steps: int = 1500, device: Any = None,
    ) -> Callable[[torch.Tensor, Sequence[dict[str, Any]]], dict[str, Any]] | None:
        """``score(images, metas) -> {"adherence_n": n, <attribute>: fraction, ...}``: how often images generated
        from captions show what the captions' metadata says (a probe read-back), or None when the dataset has none.
        The probe is loaded from ``probe_dir`` (trained on ``data_dir`` there first if missing); a dataset with more
        than one read-back model keeps the others inside that folder (shapes: ``probe_dir/pair_detector``)."""
        return None

    def label_paths(self) -> dict[str, str]:
        """Labels a latent cache stores by default: name -> path in each sample's json (``latents.label_at``)."""
        return {}


def dataset_module(name: str) -> ModuleType:
    """The module of a registered dataset; an unknown name lists the known ones."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}")
    return importlib.import_module(DATASETS[name])


def benchmark_named(name: str | None) -> Benchmark | None:
    """The registered dataset's ``BENCHMARK`` (None for no name, an unregistered one, or no hooks)."""
    if not name or name not in DATASETS:
        return None
    return getattr(dataset_module(name), "BENCHMARK", None)
