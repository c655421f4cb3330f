"""A replica's plain writes: a ``pwrite``, a checksum per block, the chunks' generations;
and its plain reads of what the page cache holds.

``DiskReplica`` (diskstore.py) writes through a ``BlockIO`` whenever it has no snapshots:
``write`` does the whole write, or refuses (False, nothing done) when the range is not whole
blocks inside the replica, when a page of checksums or generations needs space first, or when a
never-written chunk needs room under a space reserve; the replica then does that and writes
again with ``prepared=True``. The writer also keeps the counters the replica's flush and
writeback read (``begun``, ``ended``, ``small_writes``, ``small_chunks``, ``chunks_written``).
``read_cached`` reads back whole blocks that are all in the page cache and match their
checksums, and leaves everything else (None) to the replica's own read.

This class is the reference; ``stores/_blockio.c`` is its compiled twin (the data
server's compiled request path writes through it without Python: see
``adapters/dataserver/_fastio.c``). ``make`` gives the compiled one unless
``CARGOHOLD_COMPILED=0`` or it was not built.
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections.abc import Callable
from typing import Any

from cargohold.core import compiled
from cargohold.core.layout import BLOCK_SIZE

try:
    from cargohold.stores import _blockio  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - the build is optional
    _blockio = None


class BlockIO:
    """See the module. ``sums`` and ``gens`` are the replica's maps (u32 per block, u64 per
    chunk, host order); ``sums_backed`` and ``gens_backed`` a byte per page of them, 1 when
    the page has space under it."""

    def __init__(self, fd: int, sums: mmap.mmap, gens: mmap.mmap, sums_backed: bytearray,
                 gens_backed: bytearray, *, size: int, epoch: int, chunk: int, piece: int,
                 small: int, reserve: bool, crc32: Callable[[Any], int]) -> None:
        self._fd = fd
        self._sums: memoryview | None = memoryview(sums).cast("I")
        self._gens: memoryview | None = memoryview(gens).cast("Q")
        self._sums_backed = sums_backed
        self._gens_backed = gens_backed
        self.size = size
        self.epoch = epoch
        self._chunk, self._piece, self._small = chunk, piece, small
        self._reserve = reserve
        self._crc32 = crc32
        self.begun = self.ended = self.small_writes = self.chunks_written = 0
        self.small_chunks: set[int] = set()

    @property
    def open(self) -> bool:
        return self._sums is not None

    def close(self) -> None:
        for view in (self._sums, self._gens):
            if view is not None:
                view.release()
        self._sums = self._gens = None

    def write(self, offset: int, data: Any, generation: int, prepared: bool = False) -> bool:
        view = memoryview(data).cast("B")
        length = len(view)
        sums, gens, chunk = self._sums, self._gens, self._chunk
        if (sums is None or gens is None or not length or offset % BLOCK_SIZE
                or length % BLOCK_SIZE or offset > self.size or length > self.size - offset):
            return False
        first, count = offset // BLOCK_SIZE, length // BLOCK_SIZE
        c0, c1 = offset // chunk, (offset + length - 1) // chunk
        if first + count > len(sums) or c1 >= len(gens):
            return False
        if not prepared:
            if self._reserve and not all(gens[c0:c1 + 1]):
                return False
            if not _backed(self._sums_backed, first * 4, (first + count) * 4):
                return False
            if generation and not _backed(self._gens_backed, c0 * 8, (c1 + 1) * 8):
                return False
        crc32 = self._crc32
        crcs = array("I", [crc32(view[i:i + BLOCK_SIZE]) or 1
                           for i in range(0, length, BLOCK_SIZE)])
        self.begun += 1
        done, piece = 0, self._piece
        while done < length:
            put = os.pwrite(self._fd, view[done:done + piece], offset + done)
            if put == 0:
                raise OSError(5, "pwrite wrote nothing")
            done += put
        sums[first:first + count] = crcs
        if generation:
            for c in range(c0, c1 + 1):
                old = gens[c]
                if generation > old:
                    gens[c] = generation
                    if not old:
                        self.chunks_written += 1
        if length < self._small:
            self.small_writes += 1
            self.small_chunks.add(c0)
        self.ended += 1
        return True


    def read_cached(self, offset: int, length: int) -> bytes | None:
        """The whole blocks at ``offset`` if every byte the replica holds of them is in the
        page cache and every block's checksum matches (never-written blocks read as zeros);
        None for anything else (out of range, unaligned, empty, not all cached, a checksum
        that does not match, closed): the replica's own read then answers or raises."""
        sums = self._sums
        if (sums is None or length <= 0 or offset % BLOCK_SIZE or length % BLOCK_SIZE
                or offset > self.size or length > self.size - offset):
            return None
        first, count = offset // BLOCK_SIZE, length // BLOCK_SIZE
        if first + count > len(sums):
            return None
        wanted = sums[first:first + count].tolist()
        if not any(wanted):
            return bytes(length)
        data = bytearray(length)
        try:
            if os.preadv(self._fd, [data], offset, os.RWF_NOWAIT) != length:
                return None
        except OSError:
            return None
        view = memoryview(data)
        for k, want in enumerate(wanted):
            block = view[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]
            if not want:
                block[:] = bytes(BLOCK_SIZE)
            elif (self._crc32(block) or 1) != want:
                return None
        return bytes(data)


def _backed(flags: bytearray, start: int, end: int) -> bool:
    page = mmap.PAGESIZE
    first, last = start // page, (end - 1) // page + 1
    return last <= len(flags) and flags.find(0, first, last) < 0


def make(*args: Any, **kwargs: Any) -> Any:
    """The compiled ``BlockIO`` if built and wanted (``core/compiled.py``), else this."""
    if _blockio is not None and compiled.wanted():
        return _blockio.BlockIO(*args, **kwargs)
    return BlockIO(*args, **kwargs)


def compiled_built() -> bool:
    return _blockio is not None
