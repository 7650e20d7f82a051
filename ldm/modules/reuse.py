"""Text-only work computed once per sampling run instead of once per denoiser call.

Every step of a sampling run hands the denoiser the same conditioning, so whatever the denoiser computes from the
text alone is the same at every step: the context refiner's tokens (``ldm.modules.context_refiner``) and each
cross-attention's keys and values, K = W_K τθ(y) and V = W_V τθ(y) (LDM, Rombach et al. 2022, eq. 3 and sec. 3.3).
Inside :func:`reuse_text_work` such a result is kept per (module, source tensors, autocast state) and handed back
on the next call with the very same source tensors; outside it, or whenever autograd records (training), nothing is
kept. Exact: the kept tensor is the one the recomputation would produce. The weights must not change inside the
scope (``TextToImagePipeline.generate`` opens it around one batch's sampling loop, where they cannot).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch

T = TypeVar("T")

ENABLED = True  # a switch for the on/off benchmark (``ldm bench --only fastpath``); off: every call computes afresh
# what this thread's (or task's) open scope keeps; None: not inside reuse_text_work
_kept: ContextVar[dict[tuple, tuple[tuple[object, ...], object]] | None] = ContextVar("ldm_reuse", default=None)


@contextmanager
def reuse_text_work() -> Iterator[None]:
    """Inside the block, :func:`reused` computes each text-only result once per source tensor (per thread: two
    threads sampling at once keep their own)."""
    token = _kept.set({} if ENABLED else None)
    try:
        yield
    finally:
        _kept.reset(token)


def reused(owner: object, sources: tuple[torch.Tensor | None, ...], compute: Callable[[], T]) -> T:
    """``compute()``, or what it returned for the same ``owner`` and the very same ``sources`` (the tensors it
    reads, e.g. tokens and mask) earlier in this :func:`reuse_text_work` scope under the same autocast setting.
    Outside a scope, or with autograd recording, always ``compute()``."""
    kept = _kept.get()
    if kept is None or torch.is_grad_enabled():
        return compute()
    device = next(s for s in sources if s is not None).device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    held = (owner, *sources)
    key = (*map(id, held), autocast)
    hit = kept.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], held, strict=True)):
        return hit[1]  # type: ignore[return-value]
    value = compute()
    kept[key] = (held, value)  # the entry holds owner and sources alive: their ids cannot be reused in the scope
    return value
