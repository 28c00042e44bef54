"""Host allocator settings for CPU inference.

Why: glibc's malloc serves blocks above its mmap threshold (128 KiB, raised dynamically up to
32 MiB) with fresh ``mmap`` pages and returns them with ``munmap`` on free. A prefill step
allocates and frees activations of tens of MiB per op (a 2048-token gate/up output of the
~100M Llama is 32 MiB), so every step faults its pages in again, one 4 KiB page at a time
(``benchmarks/host_allocator.py`` counts the faults and the time they cost).
The price is that the process keeps its peak heap instead of returning it to the system,
which a long-running server does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks at least this large still get their own mapping (one-off giant buffers such as the
# KV pool or weights, which are never freed in a step).
_MMAP_THRESHOLD_BYTES = 1 << 30
_TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache
def keep_freed_host_memory() -> bool:
    """Make glibc malloc reuse freed large blocks instead of unmapping them; once per process.

    Returns False where it does not apply (not Linux/glibc, or mallopt refused)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1 and ok
