"""Heap and garbage collector tuning for the processes on the data path (the data servers).

A data server moves 1 MiB buffers all the time (each sequential read answer). glibc serves
an allocation that big with a fresh ``mmap`` until its dynamic threshold has grown, and gives
freed heap back to the kernel (``trim``) as soon as the top of the heap is free; either way
the next 1 MiB buffer starts as untouched memory and costs 256 page faults (and zeroing)
before a byte is copied into it. Measured on the development machine: a data
server's 1 MiB read cost 1.4-1.7 ms of CPU with the defaults, 0.8-1.0 ms with these settings
(the engine showed no difference: it is left alone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

#: Tracked allocations between young collections, young collections between middle ones,
#: middle ones between full ones (Python's defaults: 700, 10, 10). A data server with
#: snapshots keeps a version record per block a snapshot holds (millions of them, in a few
#: long-lived dicts and sets), and each full collection walks them all: with the defaults
#: that was ~8% of a data server's CPU under 4 KiB random writes with 64 snapshots
#: (perf: visit_decref, visit_reachable, gc_collect_main). Cycles are rare on this path;
#: collected later, they cost a little memory.
GC_THRESHOLDS = (10_000, 50, 100)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap (anything up to a few 1 MiB frames).
MMAP_THRESHOLD = 4 << 20
#: Free heap kept for reuse instead of being returned to the kernel.
TRIM_THRESHOLD = 64 << 20


def keep_large_buffers() -> bool:
    """Make glibc reuse freed 1 MiB buffers; False where that is not possible (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    done = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and done
    if not done:
        log.info("mallopt refused the heap settings; large buffers are allocated afresh")
    return done


def collect_rarely() -> None:
    """Run the cyclic garbage collector less often (``GC_THRESHOLDS``)."""
    gc.set_threshold(*GC_THRESHOLDS)
