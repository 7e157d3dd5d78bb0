"""The C heap's behaviour in a training process (glibc's ``mallopt``).

A training step allocates and frees many temporaries of a few hundred KiB to a few MiB
(projected gradients, dequantised 8-bit states, online-PCA products). glibc raises its mmap
threshold to the size of every mapped block it frees (up to 32 MiB), so after the first step
such temporaries come from its heap, and a heap fragments: the resident peak of the 1B
layer-wise + 8-bit OSD run grew 13.1 -> 16.6 GB over 3 steps with the default allocator
(docs/memory.md). With the threshold fixed at 64 KiB, blocks that size and larger keep
getting their own mappings, returned to the system when freed, and the peak stays flat, at
the price of faulting those pages in again on each use. ``MALLOC_MMAP_THRESHOLD_=65536``
does it from the environment; :func:`compact_heap` from inside the process (``osd train
--compact-heap``, on by default with ``--layerwise``), for the allocations that follow.
"""

from __future__ import annotations

import ctypes

__all__ = ["compact_heap"]

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def compact_heap(threshold: int = 64 * 1024) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (which also stops it from growing):
    later allocations that size or larger that the heap's top cannot hold get their own
    mapping, returned to the system when freed. True if set; False where the C library has
    no ``mallopt`` (not glibc: macOS, musl), where nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1
