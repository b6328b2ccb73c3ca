"""Host memory given back during a run's start-up.

glibc serves a block below its mmap threshold from its heap, and raises that threshold to the
size of every large block freed (up to 32 MiB), so the layer-sized blocks that a partitioned
build, a streamed weights file and DeepSpeed's flattening of the partitions allocate and free stay
resident: freed, but never returned. Measured on a ViT-L/16 ZeRO-3 fine-tune (2 CPU ranks), that
retention was most of the start-up transient, 0.90 of the fp32 model's size; with the threshold
held at its initial 128 KiB, 0.21, of which what grows with the model is 0.03 (docs/performance.md).

During start-up the threshold is held there (and the heap's free top trimmed above 128 KiB, glibc's
default): blocks above it are mapped and, once freed, unmapped. Afterwards both are set where
glibc's own adjustment ends in a training loop, 32 MiB and twice that, so steps keep reusing their
heap blocks. No library exposes `mallopt`; this is the ctypes call.
A threshold the user set (MALLOC_MMAP_THRESHOLD_) is left alone, and so is any other allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
START_UP_THRESHOLD = 128 * 1024  # glibc's initial thresholds
STEADY_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit hosts; trim at twice it


def _glibc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@contextmanager
def freed_memory_returned() -> Iterator[None]:
    """Blocks of 128 KiB and more go back to the system when freed, for the duration."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, START_UP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, START_UP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * STEADY_THRESHOLD)
