"""Exponential moving average of a model's weights (Polyak averaging, as used by DDPM and LDM).

The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early averages are not
dominated by the random initialisation (the schedule of the TensorFlow ExponentialMovingAverage with
``num_updates``, used in the CompVis code). Plain tensors only: no Lightning, any device/dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copy of ``model``'s floating-point parameters; buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = nn.ParameterList(
            [nn.Parameter(p.detach().clone(), requires_grad=False)
             for n, p in model.named_parameters() if p.requires_grad]
        )

    def current_decay(self) -> float:
        """The decay applied at the next update: min(decay, (1+n)/(10+n))."""
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow ← d·shadow + (1−d)·θ  (one fused lerp per tensor list)."""
        d = self.current_decay()
        params = dict(model.named_parameters())
        current = [params[n].detach() for n in self.names]
        shadow = list(self.shadow)
        torch._foreach_lerp_(shadow, [c.to(s.dtype) for c, s in zip(current, shadow)], 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model``. A sharded shadow (FSDP2 DTensors, one slice per rank) goes
        into a plain model whole: gathered, a collective every rank must join."""
        params = dict(model.named_parameters())
        for n, s in zip(self.names, self.shadow):
            target = params[n]
            if type(s) is not type(target) and hasattr(s, "full_tensor"):
                s = s.full_tensor()
            target.copy_(s)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily run ``model`` with the EMA weights (e.g. for validation sampling)."""
        params = dict(model.named_parameters())
        backup = [params[n].detach().clone() for n in self.names]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, b in zip(self.names, backup):
                    params[n].copy_(b)
