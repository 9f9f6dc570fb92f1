"""Freed memory kept for reuse while held, handed back after (glibc only)."""

import os
import platform

import numpy as np
import pytest

from clipseg3d.inference import heap

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the heap settings are glibc's")

BLOCK_BYTES = 256 << 20  # far above glibc's largest mmap threshold (32 MiB)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def freed_block_growth() -> int:
    """Resident bytes left behind by a touched and freed ``BLOCK_BYTES`` block."""
    before = resident_bytes()
    block = np.ones(BLOCK_BYTES // 8)
    del block
    return resident_bytes() - before


def test_freed_blocks_stay_mapped_while_held_and_are_returned_after():
    assert freed_block_growth() < BLOCK_BYTES // 4  # by default: unmapped when freed
    start = resident_bytes()
    with heap.freed_memory_reused():
        with heap.freed_memory_reused():  # nested holders: the outer one decides
            assert freed_block_growth() > BLOCK_BYTES * 3 // 4
        kept = resident_bytes() - start
        assert kept > BLOCK_BYTES * 3 // 4
        assert freed_block_growth() < BLOCK_BYTES // 4  # reused, not added
    assert resident_bytes() - start < BLOCK_BYTES // 4
    assert freed_block_growth() < BLOCK_BYTES // 4


def test_a_forked_child_starts_with_the_defaults():
    with heap.freed_memory_reused():
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            os.close(reader)
            os.write(writer, str(freed_block_growth()).encode())
            os._exit(0)
        os.close(writer)
        growth = int(os.read(reader, 64))
        os.close(reader)
        os.waitpid(child, 0)
    assert growth < BLOCK_BYTES // 4
