"""Key tables: the one description of how a part's weights are named in another layout, used both ways.

A :class:`KeyTable` is a list of :class:`Row` s, each naming the same weights in our layout (``ours``) and in
the other one (``theirs``: diffusers, or the CompVis/A1111 single file), with the exact tensor operation between
them (``op``):

* ``same``   one tensor each side, unchanged;
* ``cat``    several of ours = one of theirs, concatenated along dim 0 (GEGLU's value | gate halves);
* ``split``  one of ours = several of theirs, our tensor cut in equal parts along dim 0 (open_clip's fused
  ``in_proj`` = q | k | v);
* ``conv``   a Linear weight (out, in) of ours = a 1x1 convolution weight (out, in, 1, 1) of theirs; reading
  accepts either form.

Every op is a view or a concatenation, so a conversion there and back is bit-identical. Tables are built
from our module's own state dict (enumerated on the meta device), so every key of ours appears exactly once;
a state dict that lacks a key the table expects, or holds one it does not know, is a :class:`ConversionError`
listing them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ldm.io import PartError

Tensor = torch.Tensor
OPS = ("same", "cat", "split", "conv")


class ConversionError(PartError, ValueError):
    """Weights or a config that cannot be converted: missing/unknown keys, a feature the target format cannot
    express, a file of unknown layout or a config that disagrees with the weights."""


@dataclass(frozen=True)
class Row:
    """The same weights named in our layout and in theirs (see the module docstring for ``op``)."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    op: str = "same"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown row op {self.op!r}")
        if (self.op == "cat" and len(self.theirs) != 1) or (self.op == "split" and len(self.ours) != 1) or \
                (self.op in ("same", "conv") and (len(self.ours), len(self.theirs)) != (1, 1)):
            raise ValueError(f"row {self} does not fit op {self.op!r}")


def listing(keys: Iterable[str], limit: int = 6) -> str:
    """``a, b, c … (+N more)``: a key list short enough for a one-line error."""
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    return head + (f" … (+{len(keys) - limit} more)" if len(keys) > limit else "")


class KeyTable:
    """Rows of one part (see the module docstring); ``name`` is how errors call the part."""

    def __init__(self, rows: Iterable[Row], name: str):
        self.rows = list(rows)
        self.name = name
        self.ours = [k for r in self.rows for k in r.ours]
        self.theirs = [k for r in self.rows for k in r.theirs]
        if len(set(self.ours)) != len(self.ours) or len(set(self.theirs)) != len(self.theirs):
            raise ValueError(f"{name}: a key appears in two rows of the table")

    def with_prefix(self, prefix: str) -> KeyTable:
        """The same table with ``prefix`` before every key of theirs (a part inside a single file)."""
        return KeyTable((Row(r.ours, tuple(prefix + k for k in r.theirs), r.op) for r in self.rows), self.name)

    def _check(self, state: dict[str, Tensor], expected: list[str], source: str, ignore: Iterable[str]) -> None:
        ignored = set(ignore)
        missing = [k for k in expected if k not in state]
        unknown = [k for k in state if k not in set(expected) and k not in ignored]
        if missing or unknown:
            parts = ([f"missing {len(missing)} keys ({listing(missing)})"] if missing else []) + \
                    ([f"{len(unknown)} unknown keys ({listing(unknown)})"] if unknown else [])
            raise ConversionError(f"{source}: the {self.name} weights do not match the expected layout: "
                                  + "; ".join(parts))

    def to_theirs(self, state: dict[str, Tensor], source: str = "ldm part") -> dict[str, Tensor]:
        """Our state dict → theirs (every key of ours must be present, no other)."""
        self._check(state, self.ours, source, ())
        out: dict[str, Tensor] = {}
        for row in self.rows:
            values = [state[k] for k in row.ours]
            if row.op == "same":
                out[row.theirs[0]] = values[0]
            elif row.op == "conv":
                out[row.theirs[0]] = values[0][:, :, None, None]
            elif row.op == "cat":
                out[row.theirs[0]] = torch.cat(values, dim=0)
            else:  # split
                out.update(zip(row.theirs, values[0].chunk(len(row.theirs), dim=0)))
        return out

    def to_ours(self, state: dict[str, Tensor], source: str = "file", ignore: Iterable[str] = ()) -> dict[str, Tensor]:
        """Their state dict → ours; keys in ``ignore`` may be present and are dropped."""
        self._check(state, self.theirs, source, ignore)
        out: dict[str, Tensor] = {}
        for row in self.rows:
            values = [state[k] for k in row.theirs]
            if row.op == "same":
                out[row.ours[0]] = values[0]
            elif row.op == "conv":
                value = values[0]
                if value.ndim == 4:
                    if value.shape[2:] != (1, 1):
                        raise ConversionError(f"{source}: {row.theirs[0]} has shape {tuple(value.shape)}, "
                                              "expected a 1x1 convolution or a linear weight")
                    value = value[:, :, 0, 0]
                out[row.ours[0]] = value
            elif row.op == "split":
                out[row.ours[0]] = torch.cat(values, dim=0)
            else:  # cat
                n = len(row.ours)
                if values[0].shape[0] % n:
                    raise ConversionError(f"{source}: {row.theirs[0]} has {values[0].shape[0]} rows, not divisible "
                                          f"into {n} parts")
                out.update(zip(row.ours, values[0].chunk(n, dim=0)))
        return out


def module_from_state(cls: type, config, state: dict[str, Tensor], source: str):
    """``cls(config)`` built on the meta device, adopting ``state`` (converted weights) as they are: their dtype,
    no copy, no random init. Keys and shapes are checked (a config that disagrees with the weights is an error
    naming both); buffers that are not weights stay on the meta device (such a part is for writing only)."""
    from ldm.io import load_state_dict_checked

    with torch.device("meta"):
        try:
            module = cls(config)
        except ValueError as e:
            raise ConversionError(f"{source}: {e}") from e
    try:
        load_state_dict_checked(module, state, source, assign=True)
    except PartError as e:
        raise ConversionError(f"the config disagrees with the weights: {e}") from e
    return module.eval()
