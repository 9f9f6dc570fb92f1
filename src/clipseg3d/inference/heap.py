"""Freed memory kept for the next window or training step instead of handed back to the system.

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps
it when it is freed, so each window's or step's activations (tens to hundreds of MB) are new pages
that the kernel must fault in and zero again. While :func:`keep_freed_memory` holds, glibc takes
such blocks from its heap and keeps the heap's free top, so the next window reuses the same,
already mapped pages; :func:`release_freed_memory` brings glibc's defaults back and returns the
free memory (``malloc_trim``). Calls nest; a forked child (a data-loader worker) starts with the
defaults. Elsewhere than glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform
from contextlib import contextmanager
from functools import cache
from typing import Iterator

# mallopt parameters and glibc's defaults (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
# The largest free heap top kept (mallopt takes an int).
KEPT_TOP_BYTES = 2**31 - 1

_holders = 0


@cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _set(mmap_max: int, trim_threshold: int, trim: bool = False) -> None:
    """glibc's mmap count limit and trim threshold; ``trim``: then return the heap's free memory."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_MAX, mmap_max)
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
        if trim:
            libc.malloc_trim(0)


def keep_freed_memory() -> None:
    """Start keeping freed blocks for reuse (see the module docstring); one more holder."""
    global _holders
    _holders += 1
    if _holders == 1:
        _set(0, KEPT_TOP_BYTES)


def release_freed_memory() -> None:
    """One holder less; the last one restores glibc's defaults and returns the free memory."""
    global _holders
    if _holders == 0:
        return
    _holders -= 1
    if _holders == 0:
        _set(DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD, trim=True)


@contextmanager
def freed_memory_reused() -> Iterator[None]:
    """:func:`keep_freed_memory` within the block, :func:`release_freed_memory` after it."""
    keep_freed_memory()
    try:
        yield
    finally:
        release_freed_memory()


def _defaults_in_child() -> None:
    """After a fork: the child holds nothing (its loader work keeps glibc's defaults)."""
    global _holders
    if _holders:
        _holders = 0
        _set(DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD)


os.register_at_fork(after_in_child=_defaults_in_child)
