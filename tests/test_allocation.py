"""The worker's malloc tuning, seen in what glibc reports (in a fresh interpreter, whose thresholds
have not yet moved with the blocks freed before)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from xray_ingest.allocation import MALLOC_MMAP_THRESHOLD

# Prints the bytes glibc holds in blocks of their own mmap() while a block is alive: one of `small`
# before tune_worker(), then what tune_worker() returned, then one of `large` after it. Freeing a
# mapped block raises glibc's own threshold to its size, so the second block is the larger.
_PROBE = """
import ctypes, sys
from xray_ingest.allocation import tune_worker

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2

def mapped_while_holding(size):
    before = mallinfo2().hblkhd
    block = bytearray(size)
    return mallinfo2().hblkhd - before

small, large = int(sys.argv[1]), int(sys.argv[2])
print(mapped_while_holding(small), tune_worker(), mapped_while_holding(large))
"""


def test_tuned_malloc_takes_blocks_below_the_threshold_from_its_heap() -> None:
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc 2.33 or newer: no mallinfo2 to read the mapped bytes from")
    small, large = MALLOC_MMAP_THRESHOLD // 8, MALLOC_MMAP_THRESHOLD * 3 // 4
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(small), str(large)],
        capture_output=True,
        text=True,
        check=True,
    )
    before, tuned, after = done.stdout.split()
    assert int(before) >= small  # glibc's default: a block this large gets its own mapping
    assert tuned == "True"
    assert int(after) == 0
