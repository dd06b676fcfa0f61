"""How a worker process allocates memory: Python's garbage collector and glibc's malloc, both
tuned for ingest, where each request allocates a body and rows that live until their COPY."""

from __future__ import annotations

import ctypes
import gc
from typing import Final

from xray_ingest.config import MIB

# Allocations between two collections of Python's youngest generation (700 by default). A worker
# allocates a few objects per event and keeps up to its queue's worth of rows alive, so at 700 it
# spent its time collecting: batches of 100 took 10.1-10.5 us of server CPU per event and had a
# p99 of 32-50 ms, against 8.6-8.9 us and 16-17 ms at this threshold (same run, same load).
GC_YOUNG_THRESHOLD: Final = 50_000

# glibc's malloc gives a block of MMAP_THRESHOLD or more its own mmap(), and hands the top of its
# heap back to the kernel once TRIM_THRESHOLD of it is free. By default both follow the blocks
# freed, so a worker taking 1 MB bodies kept mapping fresh pages, and the kernel zeroed each one
# as it was first touched: 0.29 page faults per event in batches of 1000. With the heap kept and
# blocks up to 8 MiB taken from it, 0.15 (the heap growing to its peak), and the server's CPU per
# event fell (alternating A/B, medians of 4 rounds: batches of 1000 5.75 -> 5.3 us, single events
# 26.35 -> 25.6 us). The peak RSS stays the same; memory freed after a peak stays with the worker.
MALLOC_MMAP_THRESHOLD: Final = 8 * MIB
MALLOC_TRIM_THRESHOLD: Final = 256 * MIB
# mallopt()'s parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3


def tune_malloc() -> bool:
    """Sets glibc malloc's mmap and trim thresholds; False where the C library has no mallopt
    (macOS) or refuses them, which leaves its own defaults."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    trim_set = mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)


def tune_worker() -> bool:
    """Tunes the collector and malloc for this process (each worker calls it as it starts);
    returns whether malloc took its settings."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    return tune_malloc()
