"""System calls on the sparse files of a data server's replicas: punching holes, giving
space without writing, starting writeback, dropping a bulk copy's pages from the page cache,
and replacing small files atomically."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writing dirty pages, do not wait
_SYNC_FILE_RANGE_WAIT = 1 | 2 | 4  # wait for writeback under way, write, wait for it


def _check(result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range of a file, keeping its size (reads then return zeros)."""
    _check(_fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length))


def allocate_keep_size(fd: int, offset: int, length: int) -> None:
    """Allocate a byte range of a file without changing its size."""
    _check(_fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length))


def start_writing(fd: int, offset: int = 0, length: int = 0) -> None:
    """Start writing the dirty pages of a byte range (0: to the end) to disk
    (``sync_file_range``); do not wait."""
    _check(_sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE))


class DropBehind:
    """Keeps a bulk copy (a restore, a clone's fill, a rebuild) from filling the page cache
    with data no one reads soon: each range written starts its writeback at once and leaves
    the cache once ``BEHIND`` more bytes were written after it. Its writeback is waited for
    then (usually long done): a copy faster than the disk waits there, where the kernel's
    dirty-page throttling would make it wait anyway, and no page is left behind dirty.

    Without it a copy of gigabytes takes a fresh page for every 4 KiB, and a VM that
    reports free pages to its host makes fresh pages cost a fault each
    (``first_touch_us`` in benchmarks/fio_bench.py): a data server restoring 2 GiB spent
    81% of its CPU copying into them. Dropped behind, the copy recycles the same pages.
    """

    BEHIND = 32 << 20

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._ranges: deque[tuple[int, int]] = deque()
        self._bytes = 0

    def written(self, offset: int, length: int) -> None:
        """``[offset, offset+length)`` was just written. A failure to start writeback or to
        drop pages changes nothing written: the next flush reports an I/O error."""
        try:
            start_writing(self._fd, offset, length)
            self._ranges.append((offset, length))
            self._bytes += length
            while self._bytes > self.BEHIND:
                offset, length = self._ranges.popleft()
                self._bytes -= length
                _check(_sync_file_range(self._fd, offset, length, _SYNC_FILE_RANGE_WAIT))
                os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            log.warning("dropping a copy's pages from the page cache failed: %s", exc)


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    """Replace ``path`` with ``value`` so that a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(value, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
