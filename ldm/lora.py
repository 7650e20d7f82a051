"""LoRA adapter folders: what ``ldm fit`` with a ``lora:`` block exports, ``ldm generate --lora`` applies and
``ldm lora merge`` bakes into a pipeline (the network side is ``ldm.modules.lora``)::

    ADAPTER/
      pytorch_lora_weights.safetensors  A/B weights in peft's format, keys "unet.<module>.lora_A.weight": for the
                                        U-Net in diffusers' module names (``ldm.interop.diffusers_unet``), the file
                                        diffusers' ``load_lora_weights`` / ``UNet2DConditionModel.load_lora_adapter``
                                        read; its "lora_adapter_metadata" holds the LoraConfig (rank, alpha, targets)
      adapter_config.json               ldm's record: the spec, the denoiser's class and config, the sha256 of the
                                        base weights it was trained on, and sampling defaults (an LCM-LoRA says
                                        sampler lcm, 4 steps, guidance 1)

A ``.safetensors`` file written by diffusers (peft format, ``unet.`` prefix) loads too; without metadata its
alpha is taken equal to its rank (diffusers' convention).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ldm import __version__
from ldm.errors import UsageError
from ldm.io import PartError, atomic_write, module_config, read_json, weights_hash, write_json
from ldm.modules.lora import (
    DEFAULT_ADAPTER,
    LoraSpec,
    adapter_names,
    add_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    set_lora_scale,
)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"   # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER_CONFIG = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"              # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "unet"                                      # diffusers' pipeline component the weights belong to
# denoiser classes whose LoRA keys are written in diffusers' names: class -> module with the two converters
DIFFUSERS_LAYOUT = {"UNet": "ldm.interop.diffusers_unet"}


@dataclass
class LoraFile:
    """A read adapter: its spec, peft-format weights in ldm's module names, and ldm's record (may be empty)."""

    spec: LoraSpec
    state: dict[str, torch.Tensor]
    record: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def sampling(self) -> dict[str, Any]:
        """Sampling defaults the adapter asks for (``{"sampler": "lcm", "steps": 4, "guidance": 1.0}``), or {}."""
        return dict(self.record.get("sampling") or {})


def _converters(denoiser: nn.Module):
    name = DIFFUSERS_LAYOUT.get(type(denoiser).__name__)
    if name is None:
        return None
    module = importlib.import_module(name)
    return module.ldm_lora_to_diffusers, module.diffusers_lora_to_ldm


def _rank_patterns(state: dict[str, torch.Tensor], spec: LoraSpec) -> tuple[dict[str, int], dict[str, float]]:
    """peft rank/alpha patterns for the modules whose rank differs from ``spec.rank``, keeping α/r (^ anchors the
    whole module name, as diffusers writes them)."""
    ranks = {k[: -len(".lora_B.weight")]: v.shape[1] for k, v in state.items() if k.endswith(".lora_B.weight")}
    odd = {f"^{m}": r for m, r in ranks.items() if r != spec.rank}
    return odd, {m: spec.scaling * r for m, r in odd.items()}


def save_lora(denoiser: nn.Module, out_dir: str | Path, spec: LoraSpec, name: str = DEFAULT_ADAPTER,
              base_hash: str | None = None, record: dict[str, Any] | None = None) -> Path:
    """Write adapter ``name`` of a LoRA-wrapped ``denoiser`` as an adapter folder (see the module docstring).

    ``base_hash``: sha256 of the base weights (default: the one the denoiser was loaded with); ``record`` adds
    entries to adapter_config.json (e.g. ``{"sampling": {...}}``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in lora_state_dict(denoiser, name).items()}
    if not state:
        raise ValueError(f"the denoiser has no LoRA adapter named {name!r}")
    converters = _converters(denoiser)
    layout = "diffusers" if converters else "ldm"
    if converters:
        try:
            state = converters[0](state, denoiser.config)
        except ValueError as e:
            raise PartError(f"cannot write the LoRA of this {type(denoiser).__name__} in diffusers' layout: {e}") from e
    rank_pattern, alpha_pattern = _rank_patterns(state, spec)
    metadata = {"r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
                "target_modules": sorted({k.rpartition(".lora_")[0] for k in state}),
                "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    packed = json.dumps({f"{PREFIX}.{k}": v for k, v in metadata.items()}, indent=2, sort_keys=True)
    tensors = {f"{PREFIX}.{k}": v for k, v in state.items()}
    atomic_write(out / WEIGHTS_NAME,
                 lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: packed}))
    write_json(out / ADAPTER_CONFIG, {
        "_class_name": "LoRA", "_ldm_version": __version__, "key_layout": layout, "lora": spec.to_dict(),
        "denoiser_class": type(denoiser).__name__, "denoiser_config": module_config(denoiser),
        "base_weights_sha256": base_hash or weights_hash(denoiser), **(record or {})})
    return out


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    if not path.exists():
        raise PartError(f"LoRA adapter {path} does not exist (an adapter folder written by `ldm fit` with a lora: "
                        f"block, or a {WEIGHTS_NAME} file)")
    raise PartError(f"LoRA adapter folder {path} has no {WEIGHTS_NAME}")


def read_lora(path: str | Path, denoiser: nn.Module | None = None) -> LoraFile:
    """Read an adapter folder (or a diffusers-format ``.safetensors`` file). With ``denoiser`` the keys come back in
    ldm's module names for its class (a file without ldm's record is taken to be in diffusers' layout); without,
    as stored."""
    path = Path(path)
    weights = _weights_file(path)
    folder = weights.parent
    record = read_json(folder / ADAPTER_CONFIG) if (folder / ADAPTER_CONFIG).is_file() else {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY) or "{}")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for bad files
        raise PartError(f"cannot read LoRA weights {weights}: {e}") from e
    state = {k[len(PREFIX) + 1:]: v for k, v in raw.items() if k.startswith(PREFIX + ".")}
    if not state:
        raise PartError(f"{weights} holds no '{PREFIX}.' LoRA weights (a text-encoder-only or non-peft LoRA?)")
    if record.get("lora"):
        spec = LoraSpec(**record["lora"])
    else:  # a foreign file: diffusers' metadata, else alpha = rank
        ranks = [v.shape[1] for k, v in state.items() if k.endswith(".lora_B.weight")]
        rank = int(meta.get(f"{PREFIX}.r", max(set(ranks), key=ranks.count)))
        spec = LoraSpec(rank=rank, alpha=meta.get(f"{PREFIX}.lora_alpha", rank), target_modules=["-"])
    layout = record.get("key_layout", "diffusers")
    if layout == "diffusers" and denoiser is not None:
        converters = _converters(denoiser)
        if converters is None:
            raise PartError(f"{weights} is in diffusers' layout, which only "
                            f"{sorted(DIFFUSERS_LAYOUT)} denoisers read")
        try:
            state = converters[1](state, denoiser.config)
        except ValueError as e:
            raise PartError(f"{weights}: {e}") from e
    return LoraFile(spec, state, record, folder)


def check_base(lora: LoraFile, denoiser: nn.Module) -> None:
    """A LoRA trained for another denoiser class/config is an error; for other base weights, a warning (LoRAs are
    often applied to fine-tunes of their base)."""
    rec = lora.record
    if rec.get("denoiser_class") and rec["denoiser_class"] != type(denoiser).__name__:
        raise PartError(f"LoRA {lora.path} was trained for a {rec['denoiser_class']}, not a {type(denoiser).__name__}")
    ours = json.loads(json.dumps(module_config(denoiser)))  # tuples as the file's lists
    if rec.get("denoiser_config") and rec["denoiser_config"] != ours:
        theirs = rec["denoiser_config"]
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise PartError(f"LoRA {lora.path} was trained on a denoiser with another config (differs in {diff})")
    base, current = rec.get("base_weights_sha256"), weights_hash(denoiser)
    if base and current and base != current:
        warnings.warn(f"LoRA {lora.path} was trained on other base weights (sha256 {base[:12]}…) than this "
                      f"denoiser's ({current[:12]}…)", UserWarning, stacklevel=3)


def apply_lora(denoiser: nn.Module, lora: LoraFile | str | Path, scale: float = 1.0, merge: bool = True,
               name: str | None = None) -> LoraFile:
    """Put an adapter on ``denoiser`` in place with weight ``scale`` (its α/r times ``scale``); with ``merge`` its
    B A is added into the base weights at once (no extra cost per step, diffusers' ``fuse_lora``), else it stays a
    separate, frozen adapter. Returns the adapter read."""
    if not isinstance(lora, LoraFile):
        lora = read_lora(lora, denoiser)
    check_base(lora, denoiser)
    name = name or f"adapter_{len(adapter_names(denoiser))}"
    modules = sorted({k.rpartition(".lora_")[0] for k in lora.state})
    spec = LoraSpec(rank=lora.spec.rank, alpha=lora.spec.alpha, target_modules=modules)
    rank_pattern, alpha_pattern = _rank_patterns(lora.state, spec)
    add_lora(denoiser, spec, name, trainable=False, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    try:
        dtype = next(denoiser.parameters()).dtype
        load_lora_state_dict(denoiser, {k: v.to(dtype) for k, v in lora.state.items()}, name)
    except ValueError as e:
        raise PartError(f"LoRA {lora.path}: {e}") from e
    set_lora_scale(denoiser, scale, name)
    if merge:
        merge_lora(denoiser)
    denoiser._ldm_weights_sha256 = None  # no longer the weights of the file it was loaded from
    return lora


def parse_lora_argument(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` → (path, scale); SCALE defaults to 1."""
    path, sep, scale = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        if Path(text).exists():
            return text, 1.0
        raise UsageError(f"--lora {text!r}: give PATH or PATH:SCALE with a number as SCALE") from None


def apply_to_pipeline(pipe: Any, loras: list[tuple[str, float]], merge: bool = True) -> list[LoraFile]:
    """Apply adapters ``[(path, scale), ...]`` to ``pipe.denoiser`` in order; the sampling defaults an adapter
    records (an LCM-LoRA: lcm sampler, few steps, guidance 1) become the pipeline's defaults."""
    applied = []
    fields = {f.name for f in dataclasses.fields(pipe.config)}
    for path, scale in loras:
        lora = apply_lora(pipe.denoiser, path, scale, merge=merge)
        pipe.config = dataclasses.replace(pipe.config, **{k: v for k, v in lora.sampling.items() if k in fields})
        applied.append(lora)
    pipe.denoiser.eval().requires_grad_(False)
    pipe._ldm_fingerprint = None  # its images change: ldm.generation hashes the new weights
    return applied
