"""LoRA adapters on any module (a denoiser above all) through ``peft`` (Hu et al. 2022, "LoRA", eq. 3):

    h = W₀ x + (α / r) · B A x,     A ∈ R^{r×k}, B ∈ R^{d×r}, B = 0 at the start (sec. 4.1),

so an adapter starts as the identity edit and only A and B train. ``peft`` replaces each targeted ``nn.Linear``
/ ``nn.Conv2d`` in place by a layer that holds the frozen base layer and the (A, B) pairs: the wrapped module
keeps its class, ``config`` and ``forward``, so a LoRA-wrapped denoiser is still a denoiser
(``ldm.modules.denoiser``). Merging adds (α/r)·scale·B A into W₀ and puts the plain layer back (sec. 4.1,
"no additional inference latency").

Several adapters may live on one module (each a name); the scale of each multiplies its α/r. File I/O
(the adapter folder diffusers reads) is ``ldm.lora``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ldm.errors import UsageError

DEFAULT_ADAPTER = "default"
# the U-Net's attention projections (q, k, v, out of self- and cross-attention: the usual SD LoRA targets)
DEFAULT_TARGETS = ("q", "k", "v", "out")


@dataclass
class LoraSpec:
    """The ``lora:`` block of a config: rank r, alpha α (None: α = r, scale 1), the modules to adapt (name
    suffixes such as ``q`` or ``attn2.k``, or one regular expression matched against whole module names) and
    dropout on the LoRA input."""

    rank: int = 4
    alpha: float | None = None
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1:
            raise UsageError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        self.rank = int(self.rank)
        self.alpha = float(self.rank if self.alpha is None else self.alpha)
        if not isinstance(self.target_modules, str):
            self.target_modules = [str(t) for t in self.target_modules]
        if not self.target_modules:
            raise UsageError("lora.target_modules is empty: name the layers to adapt (e.g. [q, k, v, out])")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        """α / r, the factor on B A."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def peft_config(spec: LoraSpec, rank_pattern: dict[str, int] | None = None,
                alpha_pattern: dict[str, float] | None = None):
    """The ``peft.LoraConfig`` of ``spec`` (B zero-initialised, A Kaiming-uniform: peft's default init)."""
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.target_modules,
                      lora_dropout=spec.dropout, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-wrapped layers of ``module`` by name (empty: no adapter)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` carries LoRA adapters."""
    return bool(lora_layers(module))


def adapter_names(module: nn.Module) -> list[str]:
    """Names of the adapters on ``module`` (in the order they were added)."""
    names: dict[str, None] = {}
    for layer in lora_layers(module).values():
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def add_lora(module: nn.Module, spec: LoraSpec, name: str = DEFAULT_ADAPTER, trainable: bool = True,
             rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None) -> nn.Module:
    """Inject adapter ``name`` into ``module`` in place (and return it). With ``trainable`` only this adapter's
    weights require gradients afterwards (the rest is frozen); without, its weights are frozen too. Every adapter
    on the module stays active."""
    from peft import inject_adapter_in_model

    if name in adapter_names(module):
        raise ValueError(f"the module already has an adapter named {name!r}")
    before = adapter_names(module)
    try:
        with warnings.catch_warnings():  # several adapters on one module are intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(peft_config(spec, rank_pattern, alpha_pattern), module, adapter_name=name)
    except ValueError as e:
        if "not found in the base model" not in str(e) and "no target" not in str(e).lower():
            raise
        linear = sorted({n.rpartition(".")[2] for n, m in module.named_modules()
                         if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise UsageError(f"lora.target_modules {spec.target_modules!r} match no Linear/Conv2d layer of the "
                         f"{type(module).__name__}; its layer names end in {linear}") from None
    for layer in lora_layers(module).values():
        layer.set_adapter(before + [name])  # peft activates only the newest adapter: keep them all on
    for param_name, param in module.named_parameters():
        own = f"lora_A.{name}." in param_name or f"lora_B.{name}." in param_name
        if trainable:
            param.requires_grad_(own)
        elif own:
            param.requires_grad_(False)
    return module


def lora_state_dict(module: nn.Module, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights in peft's format: ``"<module>.lora_A.weight"`` (r, in, ...) and
    ``"<module>.lora_B.weight"`` (out, r, ...) (detached copies)."""
    out = {}
    for layer_name, layer in lora_layers(module).items():
        if name in layer.lora_A:
            out[f"{layer_name}.lora_A.weight"] = layer.lora_A[name].weight.detach().clone()
            out[f"{layer_name}.lora_B.weight"] = layer.lora_B[name].weight.detach().clone()
    return out


@torch.no_grad()
def load_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor], name: str = DEFAULT_ADAPTER) -> None:
    """Copy peft-format weights (:func:`lora_state_dict`) into adapter ``name``; every key must fit."""
    layers = lora_layers(module)
    expected = {f"{n}.lora_{h}.weight" for n, layer in layers.items() if name in layer.lora_A for h in "AB"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"LoRA weights do not fit adapter {name!r}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for key, value in state.items():
        layer_name, _, rest = key.rpartition(".lora_")
        part = getattr(layers[layer_name], f"lora_{rest[0]}")[name]
        if part.weight.shape != value.shape:
            raise ValueError(f"LoRA weight {key}: shape {tuple(value.shape)} does not fit {tuple(part.weight.shape)}")
        part.weight.copy_(value)


def set_lora_scale(module: nn.Module, scale: float, name: str = DEFAULT_ADAPTER) -> None:
    """Multiply adapter ``name``'s α/r by ``scale`` (1 = as trained, 0 = off)."""
    for layer in lora_layers(module).values():
        if name in layer.lora_A:
            layer.set_scale(name, scale)


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Add every active adapter's (α/r)·scale·B A into its base weight and put the plain layers back, in place
    (LoRA sec. 4.1). Returns ``module`` with no LoRA layer left."""
    for layer_name, layer in lora_layers(module).items():
        layer.merge()
        parent_name, _, child = layer_name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return module
