"""glibc's allocator settings for a long-running engine process.

Each iteration allocates activations and logits of up to tens of MB in sizes that change with the batch.
On a 2-core Xeon, a server that had seen many batch shapes ran every iteration 15-25% slower from then on
(docs/benchmarks.md, 2026-12-05): the engine thread's arena created a fresh 64 MiB heap for such a block and
unmapped it again when it was freed, dozens of times per iteration, every page faulted in and zeroed anew.
One arena that does not return its top to the kernel, and a fixed mmap threshold, keep those blocks in
reused memory. (The rest of that slowdown, oneDNN's kernel caches, is handled where ``niyama`` is imported.)
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MALLOC_SETTINGS = {
    M_ARENA_MAX: 1,  # every thread in the main heap: a thread's own arena deletes heaps that fall empty
    M_TRIM_THRESHOLD: 1 << 30,  # keep freed memory at the heap's top (peak use stays resident)
    M_MMAP_THRESHOLD: 32 << 20,  # glibc's largest: blocks below it come from the heap, not fresh mappings
}


def tune_process() -> bool:
    """Apply ``MALLOC_SETTINGS``; whether the allocator took them (False: not glibc). Call it before the
    engine's threads start: a thread keeps the arena it got at its first allocation."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())
