"""Peak memory of one call, counted exactly: what the fast path weighs a faster path against, and what ``ldm bench``
reports.

On CUDA the caching allocator's own peak; on other devices a dispatch mode that sees every storage an operator
creates and when Python frees it, so the count is exact, deterministic and blind to other processes and to the C
library's allocator (unlike an RSS delta).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates until Python frees it; keeps the peak of the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage not in self.seen:
                    nbytes = storage.nbytes()
                    self.seen[storage] = nbytes
                    self.live += nbytes
                    weakref.finalize(storage, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """The largest sum of bytes of tensors created by one call of ``fn`` and alive at once (activations, gradients,
    temporaries, a copy of the weights the call makes); tensors that existed before the call are not counted."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    counter = LiveBytes()
    with counter:
        fn()
    return counter.peak
