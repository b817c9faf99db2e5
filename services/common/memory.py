"""Process memory tuning for services that handle messages of tens of MiB.

glibc serves allocations above its mmap threshold (at most 32 MiB by default) with fresh
`mmap`ed pages and returns them on free, so every 45 MiB update costs ~11,000 page faults
and the kernel zeroing the pages: that, not copying, dominated encode/decode time. Raising
the threshold and the trim threshold keeps freed blocks in the heap for the next message.
Peak memory is unchanged (one message's worth is reused), RSS just does not shrink.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import structlog

log = structlog.get_logger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30
"""Allocations below 1 GiB come from the reusable heap instead of fresh mmaps."""
TRIM_THRESHOLD_BYTES = (1 << 31) - 1
"""Freed heap memory is kept for reuse rather than returned to the kernel."""


def reuse_freed_memory() -> bool:
    """Tune glibc malloc for large, repeated messages; False where that is not possible."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the defaults
        return False
    if not tuned:
        log.info("malloc_tuning_refused")
    return tuned
