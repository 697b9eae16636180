"""Process settings for a long-running engine: glibc's allocator and oneDNN's caches.

Both keep a server as fast after a burst of load as when it was fresh. Each iteration allocates
activations and logits of up to tens of MB in sizes that change with the batch, and each new batch size
is a new shape for oneDNN's matmuls. On a 2-core Xeon, a server that had seen many batch shapes ran every
iteration 15-25% slower from then on (docs/benchmarks.md, 2026-12-05), for two reasons:

- glibc: the engine thread's arena created a fresh 64 MiB heap for such a block and unmapped it again when
  it was freed, dozens of times per iteration, every page faulted in and zeroed anew. One arena that does
  not return its top to the kernel, and a fixed mmap threshold, keep those blocks in reused memory.
- oneDNN (through torch's ideep) caches 1,024 primitives by default, fewer than the shapes a server meets
  (every token count up to the batch budget, times four projections): once full, shapes are evicted and
  their kernels generated again.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MALLOC_SETTINGS = {
    M_ARENA_MAX: 1,  # every thread in the main heap: a thread's own arena deletes heaps that fall empty
    M_TRIM_THRESHOLD: 1 << 30,  # keep freed memory at the heap's top (peak use stays resident)
    M_MMAP_THRESHOLD: 32 << 20,  # glibc's largest: blocks below it come from the heap, not fresh mappings
}
PRIMITIVE_CACHE_CAPACITY = 16384  # ~4 projections × every batch size up to 4,096 tokens

# Read by oneDNN and ideep when they first build a primitive; a value already set by the user is kept.
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def tune_process() -> bool:
    """Apply the settings above; whether the allocator took them (False: not glibc). Call it before the
    engine's threads start (a thread keeps the arena it got at its first allocation) and before the model
    loads (the caches' capacities are read once)."""
    for name in CACHE_VARIABLES:
        os.environ.setdefault(name, str(PRIMITIVE_CACHE_CAPACITY))
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())
