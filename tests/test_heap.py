"""Freed memory kept for reuse while held, handed back after (glibc only)."""

import ctypes
import os

import numpy as np
import pytest

from clipseg3d.inference import heap
from clipseg3d.training.memory import FreedMemoryKept
from test_inference_paths import random_task

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="the heap settings are glibc's")

BLOCK_BYTES = 256 << 20  # far above glibc's largest mmap threshold (32 MiB)
UNTOUCHED_BYTES = 4 << 30  # larger than any free heap block the test run leaves, and never touched


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def freed_block_growth() -> int:
    """Resident bytes left behind by a touched and freed ``BLOCK_BYTES`` block."""
    before = resident_bytes()
    block = np.ones(BLOCK_BYTES // 8)
    del block
    return resident_bytes() - before


def served_by_mmap() -> bool:
    """Whether glibc gives a large (untouched) block a mapping of its own rather than heap space."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    block = np.empty(UNTOUCHED_BYTES, np.uint8)
    mapped = libc.mallinfo2().hblkhd - before >= UNTOUCHED_BYTES
    del block
    return mapped


def test_freed_blocks_stay_mapped_while_held_and_are_returned_after():
    assert heap._holders == 0, "an earlier caller still holds the setting"
    assert served_by_mmap()
    start = resident_bytes()
    with heap.freed_memory_reused():
        assert not served_by_mmap()
        with heap.freed_memory_reused():  # nested holders: the outer one decides
            assert freed_block_growth() > BLOCK_BYTES // 2
        assert resident_bytes() - start > BLOCK_BYTES // 2  # kept (some pages may have been resident already)
        assert freed_block_growth() < BLOCK_BYTES // 4  # reused, not added
        assert not served_by_mmap()
    assert resident_bytes() - start < BLOCK_BYTES // 4  # returned
    assert served_by_mmap()


def test_a_forked_child_starts_with_the_defaults():
    with heap.freed_memory_reused():
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            os.close(reader)
            os.write(writer, b"1" if served_by_mmap() else b"0")
            os._exit(0)
        os.close(writer)
        answer = os.read(reader, 8)
        os.close(reader)
        os.waitpid(child, 0)
    assert answer == b"1"


def test_training_holds_the_setting_until_it_ends_or_fails():
    callbacks = [c for c in random_task().configure_callbacks() if isinstance(c, FreedMemoryKept)]
    assert len(callbacks) == 1
    kept = callbacks[0]
    kept.on_train_start(None, None)
    assert not served_by_mmap()
    kept.on_exception(None, None, RuntimeError("a failed step"))
    assert served_by_mmap()
    kept.on_train_end(None, None)  # already released: nothing more
    assert heap._holders == 0
