"""keep_freed_memory: make glibc reuse freed memory for large tensors (opt-in, process-wide)."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit


def keep_freed_memory(trim_threshold: int = 2**30) -> bool:
    """Ask glibc to serve allocations up to 32 MiB from its heap and to keep up to `trim_threshold` bytes of
    freed memory instead of returning it to the OS.

    `run_with_cache` keeps every activation alive, so by default glibc gives each large intermediate fresh
    pages from the OS and the page faults cost 20-30% on Gemma-sized layers (README, Performance); after this
    call the overhead is ~0-3%. Process-wide and permanent (the process holds on to freed memory); the same as
    setting MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ before Python starts. Returns False where glibc's
    `mallopt` is not available (then nothing changed).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
