"""What of a file the page cache holds, for tests of what the stores keep in memory."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

PAGE = mmap.PAGESIZE


def cached(path: Path, pages: int) -> list[bool]:
    """Which of a file's first ``pages`` pages are in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), pages * PAGE) as area:
        where = ctypes.c_char.from_buffer(area)
        found = ctypes.create_string_buffer(pages)
        assert libc.mincore(ctypes.addressof(where), pages * PAGE, found) == 0
        del where
    return [bool(v & 1) for v in found.raw]
