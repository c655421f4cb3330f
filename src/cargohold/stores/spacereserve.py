"""The free space a data server keeps on its disk for writes into chunks already in use."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from cargohold.core.layout import CHUNK_SIZE
from cargohold.errors import NoSpace

log = logging.getLogger(__name__)


class SpaceReserve:
    """The free space a data server keeps for writes into chunks already in use.

    Volumes are thin: a disk shared by many fills up while their file systems still believe
    they have room. Once the disk's free space is below the reserve, a write that would make
    a never-written chunk (new data) is refused with ``NoSpace`` (the application sees
    ENOSPC), while writes into chunks already written (journals, inode tables, overwritten
    data) still land, so a file system's metadata is not the write that meets a full disk.
    Free space is read at start, every ``CHECK_EVERY`` bytes of new chunks, by the server's
    writeback turn (``refresh``), and before refusing once it was short (at most every
    ``RECHECK_SHORT``): space freed by a delete and fstrim is writable at once. ``reserve``
    -1: 1% of the disk, 64 MiB to 4 GiB, and never more than an eighth of a small disk.
    """

    CHECK_EVERY = 16 * CHUNK_SIZE
    RECHECK_SHORT = 0.1  # seconds: below the reserve, free space is read again this often

    def __init__(self, root: Path, reserve: int = -1) -> None:
        self.root = root
        if reserve < 0:
            usage = os.statvfs(root)
            size = usage.f_blocks * usage.f_frsize
            reserve = min(max(size // 100, 64 << 20), 4 << 30, size // 8)
        self.reserve = reserve
        self.short = False
        self._since = 0
        self._checked = 0.0
        self.refresh()

    def refresh(self) -> None:
        if not self.reserve:
            return
        self._checked = time.monotonic()
        usage = os.statvfs(self.root)
        was, self.short = self.short, usage.f_bavail * usage.f_frsize < self.reserve
        if self.short and not was:
            log.warning("less than the %d MiB reserve free on %s: new chunks are refused, "
                        "writes into chunks in use go on", self.reserve >> 20, self.root)

    def allocate(self, length: int, server: str) -> None:
        """Called before a write that makes new chunks; NoSpace once the reserve is hit."""
        self._since += length
        if self._since >= self.CHECK_EVERY or (
                self.short and time.monotonic() - self._checked > self.RECHECK_SHORT):
            self._since = 0  # short: read again before refusing (space may be free again)
            self.refresh()
        if self.short:
            raise NoSpace(server=server, detail=f"the disk is down to its reserve of "
                          f"{self.reserve >> 20} MiB, kept for writes into chunks in use")
