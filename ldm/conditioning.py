"""What a denoiser is conditioned on: one small dataclass that travels from the text encoder to the denoiser.

The text conditioner produces it (``CLIPTextConditioner.condition(prompts)``), the latent cache stores it,
training drops it for classifier-free guidance in one place (:func:`drop_for_guidance`, Ho & Salimans 2022,
algorithm 1) and sampling batches cond and uncond in one place (:meth:`Conditioning.cat`, used by
``ldm.diffusion.guidance``). A denoiser is anything with ``forward(x, t, cond: Conditioning)``.

Fields, for a batch of B samples:

* ``tokens`` (B, L, D): the token states τθ(y) the denoiser cross-attends to (LDM eq. 3);
* ``mask`` (B, L) bool or None: True on real tokens, False on padding (None: every token is real);
* ``pooled`` (B, E) or None: a pooled sentence embedding (GLIDE sec. 2.3, SDXL sec. 2.1);
* ``extras``: named (B, ...) tensors such as the guidance scale of a w-conditioned denoiser
  (``extras[GUIDANCE_SCALE]``, (B,) standard CFG scales; LCM's w) or a class label.

Pure tensors: no nn.Module, no I/O, no Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_ROWS_CHECKED = WeakIdKeyDictionary()  # mask tensor -> its version counter when every row kept a token


def every_row_keeps_a_token(mask: Tensor) -> bool:
    """True when each row of a (B, L) bool mask keeps at least one token (a row of padding only has no attention
    distribution). A True answer is remembered for this tensor and its version counter, so a sampler calling the
    denoiser once per step with the same conditioning pays the device-to-host sync of the check once, not per step.
    (Inference tensors have no version counter: for them the tensor's identity alone is remembered.)"""
    version = -1 if mask.is_inference() else mask._version
    if _ROWS_CHECKED.get(mask) == version:
        return True
    if not bool(mask.any(dim=1).all()):
        return False
    _ROWS_CHECKED[mask] = version
    return True

GUIDANCE_SCALE = "guidance_scale"  # extras key: (B,) CFG scales fed to a w-conditioned denoiser (Meng et al. 2023)


@dataclass
class Conditioning:
    """Token states + mask + pooled vector + named extras for B samples (see the module docstring)."""

    tokens: Tensor
    mask: Tensor | None = None
    pooled: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"Conditioning.tokens must be (B, L, D), got shape {tuple(self.tokens.shape)}")
        b, length = self.tokens.shape[:2]
        if self.mask is not None and tuple(self.mask.shape) != (b, length):
            raise ValueError(f"Conditioning.mask must be (B, L) = {(b, length)}, got {tuple(self.mask.shape)}")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != b):
            raise ValueError(f"Conditioning.pooled must be (B={b}, E), got {tuple(self.pooled.shape)}")
        for name, value in self.extras.items():
            if value.ndim < 1 or value.shape[0] != b:
                raise ValueError(f"Conditioning.extras[{name!r}] must have batch size {b}, got {tuple(value.shape)}")

    # ---- shape ------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def length(self) -> int:
        """L, the number of token positions (padding included)."""
        return self.tokens.shape[1]

    def full_mask(self) -> Tensor:
        """The mask as a (B, L) bool tensor (all True when ``mask`` is None)."""
        if self.mask is None:
            return torch.ones(self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)
        return self.mask.to(torch.bool)

    # ---- transforms (each returns a new object; tensors are shared where unchanged) -------------------
    def map(self, fn) -> Conditioning:
        """Apply ``fn`` to every tensor (tokens, mask, pooled, extras)."""
        return Conditioning(fn(self.tokens), None if self.mask is None else fn(self.mask),
                            None if self.pooled is None else fn(self.pooled),
                            {k: fn(v) for k, v in self.extras.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to ``device``; floating tensors are cast to ``dtype`` (the mask stays bool, labels stay ints)."""
        def move(x: Tensor) -> Tensor:
            return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)
        return self.map(move)

    def index(self, rows: Tensor | slice | Sequence[int]) -> Conditioning:
        """The given rows (a slice, an index list or a bool/long tensor)."""
        if isinstance(rows, slice):
            return self.map(lambda x: x[rows])
        idx = torch.as_tensor(rows, device=self.tokens.device)
        return self.map(lambda x: x[idx.to(x.device)])

    def expand(self, batch: int) -> Conditioning:
        """Broadcast a batch of 1 to ``batch`` rows (views, no copy); a batch of ``batch`` is returned as is."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"conditioning batch {self.batch_size} does not match sample batch {batch} "
                             f"(use 1 or {batch})")
        return self.map(lambda x: x.expand(batch, *x.shape[1:]))

    def pad_to(self, length: int) -> Conditioning:
        """Right-pad tokens with zeros and the mask with False up to ``length`` positions."""
        extra = length - self.length
        if extra <= 0:
            return self
        mask = F.pad(self.full_mask(), (0, extra), value=False)
        return dataclasses.replace(self, tokens=F.pad(self.tokens, (0, 0, 0, extra)), mask=mask)

    def trim(self) -> Conditioning:
        """Cut the padding columns that no row uses. Exact under masked cross-attention (padded keys are ignored)
        and for a causal text tower (real tokens never see the padding after them)."""
        if self.mask is None:
            return self
        keep = max(int(self.mask.sum(dim=1).max()), 1)
        if keep == self.length:
            return self
        return dataclasses.replace(self, tokens=self.tokens[:, :keep], mask=self.mask[:, :keep])

    def where(self, take_other: Tensor, other: Conditioning) -> Conditioning:
        """Row i from ``other`` where ``take_other[i]``, else from ``self``; ``other`` may be a batch of 1.

        Tokens are padded to a common length first. An extra that ``other`` lacks is kept from ``self``.
        """
        other = other.expand(self.batch_size)
        length = max(self.length, other.length)
        a, b = self.pad_to(length), other.pad_to(length)
        pick = take_other.to(torch.bool)

        def choose(x: Tensor, y: Tensor) -> Tensor:
            cond = pick.to(x.device).view(-1, *([1] * (x.ndim - 1)))
            return torch.where(cond, y.to(device=x.device, dtype=x.dtype), x)

        if (a.pooled is None) != (b.pooled is None):
            raise ValueError("both conditionings need a pooled embedding, or neither")
        mask = None if self.mask is None and other.mask is None else choose(a.full_mask(), b.full_mask())
        pooled = None if a.pooled is None else choose(a.pooled, b.pooled)
        extras = {k: choose(v, b.extras[k]) if k in b.extras else v for k, v in a.extras.items()}
        return Conditioning(choose(a.tokens, b.tokens), mask, pooled, extras)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch, padding tokens to the longest; every item must carry the same fields."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        if len({c.pooled is None for c in items}) > 1 or len({tuple(sorted(c.extras)) for c in items}) > 1:
            raise ValueError("Conditioning.cat: items differ in pooled/extras fields")
        length = max(c.length for c in items)
        padded = [c.pad_to(length) for c in items]
        any_mask = any(c.mask is not None for c in items)
        mask = torch.cat([c.full_mask() for c in padded]) if any_mask else None
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in padded])
        extras = {k: torch.cat([c.extras[k] for c in padded]) for k in items[0].extras}
        return Conditioning(torch.cat([c.tokens for c in padded]), mask, pooled, extras)

    # ---- storage (the latent cache) ---------------------------------------------------------------
    def to_tensors(self) -> dict[str, Tensor]:
        """Flat name → tensor dict for safetensors: context, mask (uint8), pooled, extra.NAME."""
        out = {"context": self.tokens, "mask": self.full_mask().to(torch.uint8)}
        if self.pooled is not None:
            out["pooled"] = self.pooled
        out.update({f"extra.{k}": v for k, v in self.extras.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> Conditioning:
        """Inverse of :meth:`to_tensors` (floats are returned as stored; use :meth:`to` to cast)."""
        if "context" not in tensors:
            raise ValueError(f"no 'context' tensor among {sorted(tensors)}")
        mask = tensors.get("mask")
        return cls(tensors["context"], None if mask is None else mask.to(torch.bool), tensors.get("pooled"),
                   {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")})


def drop_for_guidance(cond: Conditioning, empty: Conditioning, p: float,
                      generator: torch.Generator | None = None) -> Conditioning:
    """Replace each sample's conditioning by ``empty`` (the "" prompt) with probability ``p``: classifier-free
    guidance training (Ho & Salimans 2022, algorithm 1, line 3). The one place conditioning is dropped."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {p}")
    if p == 0.0:
        return cond
    device = generator.device if generator is not None else cond.tokens.device
    drop = torch.rand(cond.batch_size, generator=generator, device=device) < p
    return cond.where(drop.to(cond.tokens.device), empty)
