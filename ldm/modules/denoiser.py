"""The denoiser protocol: what the pipeline, LatentDiffusion, guidance, the cache and interop speak to.

A denoiser is an ``nn.Module`` built as ``Class(config)`` from a config dataclass (``Class.config_class``)
with at least the fields ``in_channels``, ``out_channels``, ``context_dim`` and ``pooled_dim``, whose

    forward(x: Tensor (B, C, H, W), t: Tensor (B,), cond: Conditioning) -> Tensor (B, out_channels, H, W)

predicts what it was trained to predict (ε, v or x0; see ``ldm.diffusion.objectives``) at (possibly
fractional) timesteps ``t``. An optional config field ``guidance_embed_dim`` (int or None) says the denoiser
reads the CFG scale from ``cond.extras["guidance_scale"]`` (w-conditioning; samplers then run it without a CFG
batch, ``ldm.diffusion.guidance.guided_model``). Concrete classes are registered in ``ldm.registry`` (``PARTS``
with kind "denoiser", and a config spelling in ``DENOISERS``); nothing else names one. The U-Net is one
implementation; a DiT or a LoRA-wrapped U-Net plugs in without touching the pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Protocol

import torch
from torch import nn

from ldm.conditioning import GUIDANCE_SCALE, Conditioning, every_row_keeps_a_token
from ldm.io import config_from_dict
from ldm.registry import denoiser_class

REQUIRED_FIELDS = ("in_channels", "out_channels", "context_dim", "pooled_dim")


class Denoiser(Protocol):
    """Structural type of a denoiser (see the module docstring)."""

    config: Any

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...


def build_denoiser(spec: dict[str, Any], defaults: dict[str, Any], source: str = "denoiser") -> nn.Module:
    """``spec`` = ``{"type": "unet", **config fields}`` → the denoiser; ``defaults`` fill the fields the spec
    leaves out (channels and conditioning widths from the VAE and text encoder). Unknown fields are an error."""
    spec = dict(spec)
    cls = denoiser_class(spec.pop("type", "unet"), source)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise TypeError(f"{cls.__name__}.config_class lacks the denoiser fields {missing}")
    values = {**{k: v for k, v in defaults.items() if k in fields}, **spec}
    return cls(config_from_dict(cls.config_class, values, source))


def conditioning_for(denoiser: nn.Module, cond: Conditioning) -> Conditioning:
    """``cond`` with only what ``denoiser`` consumes: the pooled embedding is dropped unless its config has a
    ``pooled_dim`` (the text encoder always makes one; the cache always stores it)."""
    if cond.pooled is not None and not getattr(denoiser.config, "pooled_dim", None):
        return dataclasses.replace(cond, pooled=None)
    return cond


def copy_denoiser(denoiser: nn.Module) -> nn.Module:
    """A fresh instance of the same class and config holding a copy of the weights (the weights of a sharded
    denoiser are gathered whole: a collective every rank must join); a wrapped denoiser (layers replaced in place,
    e.g. by LoRA adapters: its state dict has other keys than a fresh instance's) is deep-copied."""
    cls = next(c for c in type(denoiser).__mro__ if getattr(c, "config_class", None) is not None
               and "FSDP" not in c.__name__)
    twin = cls(denoiser.config)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in denoiser.state_dict().items()}
    if state.keys() != twin.state_dict().keys():
        return copy.deepcopy(denoiser)
    twin.load_state_dict(state)
    return twin


def derive_denoiser(denoiser: nn.Module, overrides: dict[str, Any], source: str = "denoiser") -> nn.Module:
    """A denoiser of the same class whose config has ``overrides`` applied, holding every weight of ``denoiser``
    that still fits; layers the overrides add keep their initialisation (e.g. the zero-initialised guidance
    embedding of ``guidance_embed_dim``). A weight that no longer fits is an error naming it."""
    overrides = {k: v for k, v in overrides.items() if k != "type"}
    if not overrides:
        return copy_denoiser(denoiser)
    values = {**dataclasses.asdict(denoiser.config), **overrides}
    twin = type(denoiser)(config_from_dict(type(denoiser.config), values, source))
    result = twin.load_state_dict(denoiser.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{source}: {overrides} drop weights of the {type(denoiser).__name__} "
                         f"({result.unexpected_keys[:4]}); only fields that keep or add layers can change")
    return twin


def check_inputs(name: str, config: Any, x: torch.Tensor, t: torch.Tensor | float, cond: Conditioning
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a denoiser call; returns ``t`` as a (B,) tensor and the cross-attention mask as (B, 1, 1, L) bool
    (None when ``cond.mask`` is None). ``name`` starts every error message (the class whose forward failed)."""
    if not isinstance(cond, Conditioning):
        raise TypeError(f"{name}: cond must be an ldm.conditioning.Conditioning, got {type(cond).__name__}")
    pooled, context = cond.pooled, cond.tokens
    if config.pooled_dim and (pooled is None or pooled.shape != (x.shape[0], config.pooled_dim)):
        got = None if pooled is None else tuple(pooled.shape)
        raise ValueError(f"{name}: this {name} is conditioned on the pooled text embedding: cond.pooled must be "
                         f"(B={x.shape[0]}, pooled_dim={config.pooled_dim}), got {got}")
    if not config.pooled_dim and pooled is not None:
        raise ValueError(f"{name}: cond.pooled was given but the {name} has no pooled_dim (set pooled_dim in its "
                         "config)")
    if x.ndim != 4 or x.shape[1] != config.in_channels:
        raise ValueError(f"{name}: x must be (B, {config.in_channels}, H, W), got {tuple(x.shape)}")
    batch = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name}: t must be a (B,) = ({batch},) tensor of timesteps, got shape {tuple(t.shape)}")
    if context.shape[0] != batch or context.shape[2] != config.context_dim:
        raise ValueError(f"{name}: cond.tokens must be (B={batch}, L, context_dim={config.context_dim}), "
                         f"got {tuple(context.shape)}; check the text encoder's width against the denoiser's "
                         "context_dim")
    if cond.mask is None:
        return t, None
    mask = cond.mask.to(device=x.device, dtype=torch.bool)
    # the check needs a host sync: under torch.compile it would break the graph, so compiled runs skip it
    if not torch.compiler.is_compiling() and not every_row_keeps_a_token(mask):
        raise ValueError(f"{name}: a cond.mask row masks every token; keep at least one (e.g. the BOS/EOS token)")
    return t, mask[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries


def guidance_features(name: str, config: Any, cond: Conditioning, x: torch.Tensor) -> torch.Tensor | None:
    """Fourier features of ``cond.extras["guidance_scale"]`` (B,) for a w-conditioned denoiser (config field
    ``guidance_embed_dim``; Meng et al. 2023, LCM sec. 4.2), else None. ``name`` starts every error message."""
    from ldm.modules.embeddings import guidance_scale_embedding

    dim = getattr(config, "guidance_embed_dim", None)
    if not dim:
        return None
    scale = cond.extras.get(GUIDANCE_SCALE)
    if scale is None:
        raise ValueError(f"{name}: this {name} is conditioned on the guidance scale (guidance_embed_dim={dim}): "
                         f"put a (B,) tensor in cond.extras[{GUIDANCE_SCALE!r}]")
    scale = scale.to(x.device).reshape(-1)
    if scale.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: cond.extras[{GUIDANCE_SCALE!r}] has {scale.shape[0]} values "
                         f"for a batch of {x.shape[0]}")
    return guidance_scale_embedding(scale, dim)


def latent_size_problem(config: Any, height: int, width: int) -> str | None:
    """Why a denoiser built for a fixed latent size (a config field ``input_size``, e.g. a DiT's learned
    positions) cannot run on ``height`` x ``width`` latents; None when it can (or has no fixed size)."""
    size = getattr(config, "input_size", None)
    if size is None or (height, width) == (size, size):
        return None
    return f"it is built for {size}x{size} latents (input_size) but gets {height}x{width}"


def check_compatible(config: Any, z_channels: int, token_dim: int, pooled_dim: int | None,
                     latent_size: tuple[int, int] | None = None) -> list[str]:
    """Reasons a denoiser config cannot run on these parts' latents and text features ([] = compatible);
    ``latent_size`` (height, width) is checked against a fixed-size denoiser's ``input_size``."""
    problems = []
    if latent_size is not None and (size := latent_size_problem(config, *latent_size)):
        problems.append(size)
    if config.in_channels != z_channels:
        problems.append(f"it reads {config.in_channels}-channel latents but the vae makes {z_channels}")
    if config.out_channels not in (z_channels, 2 * z_channels):
        problems.append(f"it outputs {config.out_channels} channels for {z_channels}-channel latents")
    if config.context_dim != token_dim:
        problems.append(f"it cross-attends to {config.context_dim}-d tokens but the text_encoder gives {token_dim}-d")
    if config.pooled_dim and config.pooled_dim != pooled_dim:
        problems.append(f"it takes {config.pooled_dim}-d pooled embeddings but the text_encoder gives {pooled_dim}-d")
    return problems
