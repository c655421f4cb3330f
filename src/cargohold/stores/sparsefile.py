"""System calls on the sparse files of a data server's replicas: punching holes, giving
space without writing, starting writeback, and replacing small files atomically."""

from __future__ import annotations

import ctypes
import json
import os
import secrets
from pathlib import Path
from typing import Any

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
