"""The host allocator: keep freed memory for the next call instead of handing it back to the kernel.

glibc's malloc serves a request above ``M_MMAP_THRESHOLD`` with a fresh ``mmap`` and returns the top of its heap to
the kernel once more than ``M_TRIM_THRESHOLD`` bytes there are free (both start at 128 KiB and rise at run time,
the first to at most 32 MiB). A model step allocates and frees megabytes of activations in a pattern that keeps
crossing these limits, so memory goes back to the kernel and comes back as fresh pages, each zeroed in a page
fault: measured here on the shapes U-Net forward at batch 32, up to 4,650 minor faults per call (18 MB); with
them gone (19-26 per call) that forward ran 0.98-1.33x as fast in four on/off runs, about 1.1x, diffusers' alike
(``ldm bench --only fastpath``, row "allocator keeps freed memory"; processes differ by as much).
:func:`keep_freed_memory` raises both limits (``mallopt``), so freed blocks are reused; the price is that the
process keeps its peak heap instead of shrinking after it, as jemalloc and tcmalloc also do.

The ``ldm`` command calls it before any work. It changes nothing when ``LDM_ALLOCATOR=system`` is set, when the
user set glibc's own ``MALLOC_*_`` tunables, or where the C library is not glibc (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30   # both limits: blocks up to 1 GiB come from the heap, up to 1 GiB of free top is kept
GLIBC_TUNABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - an AttributeError says "not glibc"
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """Raise glibc's trim and mmap thresholds to ``keep_bytes`` (see the module docstring); True when set now or
    before, False when left alone (``LDM_ALLOCATOR=system``, the user's ``MALLOC_*_`` tunables, not glibc)."""
    global _applied
    if _applied is not None:
        return _applied
    libc = None
    if os.environ.get("LDM_ALLOCATOR", "") != "system" and not any(k in os.environ for k in GLIBC_TUNABLES):
        libc = _glibc()
    _applied = bool(libc and libc.mallopt(M_MMAP_THRESHOLD, keep_bytes) and libc.mallopt(M_TRIM_THRESHOLD, keep_bytes))
    return _applied
