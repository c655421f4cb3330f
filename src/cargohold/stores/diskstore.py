"""The disk store: replicas as files in a data server's directory (the on-disk format).

Each replica is a directory ``REPLICAS_DIR/VOLUME_ID`` holding ``data`` (the volume's bytes,
sparse), ``sums`` (a CRC32 per block, 0 = never written), ``gens`` (a generation per chunk)
and ``epoch`` (the highest epoch seen, in two slots written in turn). The interface it
implements, and what each method promises, is :mod:`cargohold.stores.chunkstore`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import secrets
import shutil
import sys
import threading
import uuid
from array import array
from pathlib import Path
from typing import Any, NoReturn

from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE, chunk_count, runs
from cargohold.errors import (
    CargoholdError,
    ChecksumMismatch,
    InvalidArgument,
    NoSpace,
    ReplicaNotFound,
)

try:  # the same CRC-32 as zlib's, computed with SIMD instructions: ~3x faster per block
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is optional
    from zlib import crc32

from cargohold.stores import blockio, versionmap
from cargohold.stores.chunkstore import (
    ZERO_BLOCK,
    BytesLike,
    ChunkStore,
    ReplicaInfo,
    SnapshotInfo,
    StoredReplica,
    block_checksum,
    check_existing_size,
    check_volume_id,
    le_u64,
)
from cargohold.stores.epochfile import EPOCH_FILE, make_epoch_file, open_epoch_file, overwrite_epoch
from cargohold.stores.spacereserve import SpaceReserve
from cargohold.stores.sparsefile import (
    DropBehind,
    allocate_keep_size,
    fsync_dir,
    punch_hole,
    start_writing,
    write_json_atomic,
)
from cargohold.stores.versionmap import VersionMap

log = logging.getLogger(__name__)

REPLICAS_DIR = "replicas"  # under a disk store's root, one directory per replica

_ZERO_PAGE = bytes(mmap.PAGESIZE)
#: Large writes reach the data file in pieces of this size, so that the page cache holds it
#: in folios of at most 64 KiB. ext4 on kernels with large folios (6.16+) caches one 1 MiB
#: ``pwrite`` as one 1 MiB folio, and every later 4 KiB write into it walks all of the
#: folio's 256 buffer heads (``ext4_block_write_begin``). Measured on the development
#: machine (kernel 6.18): a 1 MiB overwrite costs 840 us of CPU in one call and 280 us in
#: 64 KiB pieces; a 4 KiB write into that cache then costs 11 us and 4 us.
_WRITE_PIECE = 64 << 10
#: Writes below this size count as scattered for writeback (``start_writeback``):
#: random I/O of file systems and databases is 4-16 KiB; a sequential stream split at extent
#: or request boundaries still comes in pieces of hundreds of KiB.
SMALL_WRITE = 64 << 10


def _pages(size: int) -> int:
    return -(-size // mmap.PAGESIZE)


def _pread(fd: int, length: int, at: int, nowait: bool) -> bytes:
    """``os.pread``; with ``nowait``, BlockingIOError unless every byte is in the page cache
    (a short read, at the end of the file, counts as not: the caller reads again, waiting)."""
    if nowait:
        out = bytearray(length)
        try:
            if os.preadv(fd, [out], at, os.RWF_NOWAIT) < length:
                raise BlockingIOError(errno.EAGAIN, "not all in the page cache")
            return bytes(out)
        except OSError as exc:  # EAGAIN goes on up; a file system that cannot tell: read
            if exc.errno != errno.EOPNOTSUPP:
                raise
    return os.pread(fd, length, at)


def _reraise(exc: OSError, server: str) -> NoReturn:
    """Raise ``NoSpace`` for a full disk, else ``exc`` itself."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpace(server=server, detail=exc.strerror or str(exc)) from exc
    raise exc


class DiskReplica(StoredReplica):
    """A replica in a directory: sparse ``data``, ``sums`` and ``gens`` (mmap), ``epoch``
    and meta.json."""

    def __init__(self, path: Path, volume_id: str, server: str,
                 space: SpaceReserve | None = None) -> None:
        meta = json.loads((path / "meta.json").read_text())
        super().__init__(volume_id, int(meta["size"]), server)
        self._path = path
        self._space = space
        self._epoch = int(meta.get("epoch", 0))
        self._lock = threading.Lock()  # flush (worker thread) against close
        # ``_ended`` (of the writer's counters) when the last flush began (-1: none yet;
        # what an earlier process left unsynced is synced then): see ``flush``
        self._flushed = -1
        self._closed = False
        self._blocks = self.size // BLOCK_SIZE
        self._epoch_fd = self._open_epoch_file()
        self._data_fd = os.open(path / "data", os.O_RDWR | os.O_CLOEXEC)
        try:
            self._sums_fd, self._sums_map = self._map(path / "sums", self._blocks * 4)
            self._gens_fd, self._gens_map = self._map(path / "gens", chunk_count(self.size) * 8)
        except BaseException:
            os.close(self._data_fd)
            if self._epoch_fd >= 0:
                os.close(self._epoch_fd)
            raise
        self._sums = memoryview(self._sums_map).cast("I")  # host order (little-endian)
        self._gens = memoryview(self._gens_map).cast("Q")
        # pages of sums and gens known to have space under them (see ``_back``)
        self._sums_backed = bytearray(_pages(self._blocks * 4))
        self._gens_backed = bytearray(_pages(chunk_count(self.size) * 8))
        self._snaps: VersionMap | None = None  # set at the first snapshot (versionmap.py)
        self._w: Any = self._writer(None)  # writes and their counters (blockio.py)
        self._w.chunks_written = self._count_written()
        self._behind = DropBehind(self._data_fd)  # bulk copies' writes (``copied``)
        if (path / versionmap.SNAPSHOTS_FILE).exists():
            try:
                self._snaps = VersionMap(path, self._blocks, volume_id, self._data_fd,
                                         self._sums)
            except BaseException:
                self.close()
                raise
            self._w.close()  # with snapshots, the version map places every write
        else:
            versionmap.remove_leftovers(path)

    def _writer(self, before: Any) -> Any:
        """A writer for the current maps, with the counters of the one ``before``."""
        space = self._space
        w = blockio.make(
            self._data_fd, self._sums_map, self._gens_map, self._sums_backed,
            self._gens_backed, size=self.size, epoch=self._epoch, chunk=CHUNK_SIZE,
            piece=_WRITE_PIECE, small=SMALL_WRITE,
            reserve=space is not None and bool(space.reserve), crc32=crc32)
        if before is not None:
            for name in ("begun", "ended", "small_writes", "chunks_written", "small_chunks"):
                setattr(w, name, getattr(before, name))
        if self._snaps is not None:
            w.close()
        return w

    def fast_io(self) -> object | None:
        w = self._w
        return w if w.open and not isinstance(w, blockio.BlockIO) else None

    @property
    def small_writes(self) -> int:  # type: ignore[override]
        return int(self._w.small_writes)

    def _count_written(self) -> int:
        written, step = 0, 1 << 20
        for start in range(0, len(self._gens), step):
            part = array("Q", self._gens[start : start + step].tobytes())
            written += len(part) - part.count(0)
        return written

    def _map(self, path: Path, size: int) -> tuple[int, mmap.mmap]:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            actual = os.fstat(fd).st_size
            if actual > size:
                # a grow that crashed before meta.json recorded the new size: the extra
                # range was never used (I/O beyond the recorded size is refused)
                log.warning("replica %s: %s is %d bytes, expected %d; cutting back the "
                            "leftover of an unfinished grow", self.volume_id, path.name,
                            actual, size)
                os.ftruncate(fd, size)
                actual = size
            if actual != size:
                raise CargoholdError(
                    detail=f"replica {self.volume_id}: {path.name} is {actual} bytes, "
                    f"expected {size}; the replica is damaged and must be rebuilt"
                )
            return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise

    def _open_epoch_file(self) -> int:
        """The epoch file's fd (-1: none; see ``open_epoch_file``), taking the highest epoch
        of it and meta.json."""
        fd, self._epoch = open_epoch_file(self._path, self._epoch, self.volume_id)
        return fd

    @property
    def epoch(self) -> int:
        return self._epoch

    def _store_epoch(self, epoch: int) -> None:
        if self._epoch_fd < 0:
            meta = {"volume_id": self.volume_id, "size": self.size, "epoch": epoch}
            try:
                write_json_atomic(self._path / "meta.json", meta)
            except OSError as exc:
                _reraise(exc, self.server)
            self._epoch = self._w.epoch = epoch
            return
        try:
            overwrite_epoch(self._epoch_fd, epoch)
        except OSError as exc:
            _reraise(exc, self.server)
        self._epoch = self._w.epoch = epoch

    def read_place(self, offset: int, length: int) -> tuple[int, int] | None:
        self._check_range(offset, length)
        if self._snaps and self._snaps.moved(offset // BLOCK_SIZE, length // BLOCK_SIZE):
            return None
        return self._data_fd, offset

    def read_verified(self, offset: int, length: int, raw: bytes) -> bytes:
        stored = self._sums[offset // BLOCK_SIZE : (offset + length) // BLOCK_SIZE].tolist()
        return self._verify(offset, raw, stored) if any(stored) else bytes(length)

    def _read(self, offset: int, length: int, nowait: bool = False) -> bytes:
        first, count = offset // BLOCK_SIZE, length // BLOCK_SIZE
        snaps = self._snaps
        if snaps is not None and count == 1 and snaps.moved(first, 1):  # one block, moved
            want = self._sums[first]
            fd, at = snaps.head_place(first)
            data = _pread(fd, length, at, nowait) if want and fd >= 0 else ZERO_BLOCK
            if not want or (crc32(data) or 1) == want:
                return ZERO_BLOCK if not want else data
            return self._verify(offset, data, [want])
        if snaps is not None and snaps.moved(first, count):
            stored = self._sums[first : first + count].tolist()
            return self._verify(offset, snaps.read_heads(first, count, nowait), stored)
        if length == BLOCK_SIZE:  # the common small read, without lists
            want = self._sums[first]
            if not want:
                return ZERO_BLOCK
            data = _pread(self._data_fd, length, offset, nowait)
            if (crc32(data) or 1) == want:
                return data
        stored = self._sums[first : first + count].tolist()
        if not any(stored):
            return bytes(length)
        return self._verify(offset, _pread(self._data_fd, length, offset, nowait), stored)

    def _verify(self, offset: int, data: bytes, stored: list[int]) -> bytes:
        """``data`` read at ``offset``, checked against the checksums ``stored``."""
        length = len(stored) * BLOCK_SIZE
        if len(data) < length:  # the file was cut short behind our back: checksums decide
            data += bytes(length - len(data))
        view = memoryview(data)
        crcs = [crc32(view[i : i + BLOCK_SIZE]) or 1 for i in range(0, length, BLOCK_SIZE)]
        if crcs == stored:
            return data
        fixed: bytearray | None = None
        for k, want in enumerate(stored):
            if want == crcs[k]:
                continue
            pos = k * BLOCK_SIZE
            if want:
                raise ChecksumMismatch(
                    volume_id=self.volume_id, offset=offset + pos, server=self.server
                )
            if not data.startswith(ZERO_BLOCK, pos):
                # data written but its checksum lost in a crash: the write was never flushed
                # (so never acknowledged as durable); the block is still 'never written'.
                if fixed is None:
                    fixed = bytearray(data)
                fixed[pos : pos + BLOCK_SIZE] = ZERO_BLOCK
        return data if fixed is None else bytes(fixed)

    def _back(self, fd: int, backed: bytearray, start: int, end: int) -> None:
        """Make sure the pages of bytes ``[start, end)`` of a mapped file have space.

        Sums and gens are sparse files written through their maps, and a store into a hole
        on a full file system is a SIGBUS that kills the data server. So each page gets its
        space (fallocate) before its first store, and a full disk becomes ``NoSpace``.
        """
        page = mmap.PAGESIZE
        first, last = start // page, (end - 1) // page + 1
        if backed.find(0, first, last) < 0:
            return
        try:
            allocate_keep_size(fd, first * page, (last - first) * page)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                _reraise(exc, self.server)
        backed[first:last] = b"\1" * (last - first)

    def _back_range(self, offset: int, length: int, generation: int) -> None:
        """Give space to the checksums and generations an I/O on this range stores."""
        first = offset // BLOCK_SIZE
        self._back(self._sums_fd, self._sums_backed, first * 4,
                   (first + length // BLOCK_SIZE) * 4)
        if generation:
            self._back(self._gens_fd, self._gens_backed, offset // CHUNK_SIZE * 8,
                       ((offset + length - 1) // CHUNK_SIZE + 1) * 8)

    def _write(self, offset: int, data: memoryview, generation: int) -> None:
        w = self._w
        try:
            if w.write(offset, data, generation):  # the common case (see blockio.py)
                return
            length = len(data)
            space = self._space
            if space is not None and space.reserve:
                first, last = offset // CHUNK_SIZE, (offset + length - 1) // CHUNK_SIZE
                if not all(self._gens[first:last + 1]):  # a chunk never written before
                    space.allocate(length, self.server)  # (refused: nothing written)
            self._back_range(offset, length, generation)
            if self._snaps is None:
                if not w.write(offset, data, generation, prepared=True):
                    raise AssertionError(f"a write of {length} at {offset} was refused")
                return
            w.begun += 1
            self._snaps.write(offset // BLOCK_SIZE, data, self._sums)
        except OSError as exc:
            self._resync_sums(offset, len(data))
            _reraise(exc, self.server)
        first, step = offset // BLOCK_SIZE, BLOCK_SIZE
        crcs = [crc32(data[i : i + step]) or 1 for i in range(0, length, step)]
        self._sums[first : first + len(crcs)] = array("I", crcs)
        if generation:
            self._record(offset, length, generation)
        if length < SMALL_WRITE:
            w.small_writes += 1
            w.small_chunks.add(offset // CHUNK_SIZE)
        w.ended += 1

    def _resync_sums(self, offset: int, length: int) -> None:
        """After a failed write, make the range's checksums match what the file holds."""
        try:
            if self._snaps is not None:
                data = self._snaps.read_heads(offset // BLOCK_SIZE, length // BLOCK_SIZE)
            else:
                data = os.pread(self._data_fd, length, offset).ljust(length, b"\0")
        except OSError:
            log.exception("replica %s: cannot re-read after a failed write", self.volume_id)
            return
        first = offset // BLOCK_SIZE
        for k in range(length // BLOCK_SIZE):
            block = data[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE]
            if self._sums[first + k] or block != ZERO_BLOCK:
                self._sums[first + k] = block_checksum(block)

    def _trim(self, offset: int, length: int, generation: int, written_only: bool) -> None:
        self._w.begun += 1
        if generation and not written_only:  # a written chunk's generation has its space
            self._back(self._gens_fd, self._gens_backed, offset // CHUNK_SIZE * 8,
                       ((offset + length - 1) // CHUNK_SIZE + 1) * 8)
        try:
            if self._snaps is not None:
                self._snaps.trim(offset // BLOCK_SIZE, length // BLOCK_SIZE, self._sums)
            else:
                punch_hole(self._data_fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                _reraise(exc, self.server)
            self._write_zeros(offset, length)
        self._clear_sums(offset // BLOCK_SIZE, length // BLOCK_SIZE)
        if generation:
            self._record(offset, length, generation, written_only)
        self._w.ended += 1

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, CHUNK_SIZE))
        end = offset + length
        while offset < end:
            offset += os.pwrite(self._data_fd, zeros[: end - offset], offset)

    def _clear_sums(self, first: int, count: int) -> None:
        """Zero ``count`` checksums; whole pages are punched so that the file stays thin.

        Only checksums that are not zero already are stored to: a page that is a hole
        stays one (a store there would need space, which a full disk does not have).
        """
        start, end = first * 4, (first + count) * 4
        page = mmap.PAGESIZE
        inner_start, inner_end = -(-start // page) * page, end // page * page
        if inner_end - inner_start >= page:
            try:
                punch_hole(self._sums_fd, inner_start, inner_end - inner_start)
                self._sums_backed[inner_start // page : inner_end // page] = bytes(
                    (inner_end - inner_start) // page)
            except OSError:
                inner_start = inner_end = start
            self._zero_sums(start, inner_start)
            self._zero_sums(inner_end, end)
        else:
            self._zero_sums(start, end)

    def _zero_sums(self, start: int, end: int) -> None:
        page = mmap.PAGESIZE
        for at in range(start, end, page):  # page by page: a big trim maps no big copy
            stop = min(end, (at // page + 1) * page)
            zeros = _ZERO_PAGE[: stop - at]
            if self._sums_map[at:stop] != zeros:
                self._sums_map[at:stop] = zeros

    def _record(self, offset: int, length: int, generation: int,
                written_only: bool = False) -> None:
        gens = self._gens
        for chunk in range(offset // CHUNK_SIZE, (offset + length - 1) // CHUNK_SIZE + 1):
            old = gens[chunk]
            if written_only and not old:
                continue
            if generation > old:
                gens[chunk] = generation
                if not old:
                    self._w.chunks_written += 1

    def copied(self, offset: int, length: int) -> None:
        if self._snaps is None:  # with snapshots, the version map places data
            self._behind.written(offset, length)

    def flush(self) -> None:
        """Sync, unless no write or trim began since the last flush began (a snapshot's
        cut, writes held, follows the flush of its freeze: it then costs no device
        flush). One that failed never ends: flushes sync again from then on."""
        with self._lock:
            if self._closed:
                raise ReplicaNotFound(server=self.server, volume_id=self.volume_id)
            ended = self._w.ended
            if ended == self._flushed and self._w.begun == ended:
                return
            os.fdatasync(self._data_fd)
            self._sums_map.flush()
            self._gens_map.flush()
            if self._snaps is not None:
                self._snaps.flush()
            self._flushed = ended

    def snapshot_ids(self) -> list[str]:
        return [] if self._snaps is None else [k.id for k in self._snaps.kept()]

    def snapshots(self) -> list[SnapshotInfo]:
        if self._snaps is None:
            return []
        alone = self._snaps.unique_bytes()
        return [SnapshotInfo(k.id, k.number, k.created, alone[k.id])
                for k in self._snaps.kept()]

    def scrub_snapshots(self) -> list[tuple[str, int]]:
        snaps = self._snaps
        if snaps is None:
            return []
        ids = {k.number: k.id for k in snaps.kept()}
        return [(ids[number], block * BLOCK_SIZE) for number, block in snaps.damaged()
                if number in ids]

    def repair_snapshot(self, snapshot_id: str, offset: int, data: BytesLike) -> None:
        if self._snaps is None or len(data) != BLOCK_SIZE or offset % BLOCK_SIZE:
            raise InvalidArgument(what="repair", detail="one block of a kept snapshot")
        number = self._snaps.find(snapshot_id).number
        self._w.begun += 1  # the next flush syncs it (see ``flush``)
        try:
            self._snaps.repair(number, offset // BLOCK_SIZE, bytes(data))
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # refused: nothing written
                self._w.ended += 1
                raise InvalidArgument(what="repair", detail=str(exc.strerror)) from exc
            _reraise(exc, self.server)
        self._w.ended += 1

    def reclaim(self, runs_at_most: int) -> int:
        snaps = self._snaps
        if snaps is None or not snaps.reclaim_pending():
            return 0
        with self._lock:  # not while the replica closes
            return 0 if self._closed else snaps.reclaim(runs_at_most)

    def _take_snapshot(self, snapshot_id: str, created: float) -> SnapshotInfo:
        try:
            if self._snaps is None:
                versionmap.make(self._path, self._blocks)
                self._snaps = VersionMap(self._path, self._blocks, self.volume_id,
                                         self._data_fd, self._sums)
                self._w.close()  # from now on the version map places every write
            self.flush()
            taken = self._snaps.take(snapshot_id, created)
        except OSError as exc:
            _reraise(exc, self.server)
        log.info("replica %s: snapshot %s taken", self.volume_id, snapshot_id)
        return SnapshotInfo(taken.id, taken.number, taken.created, 0)

    def _delete_snapshot(self, snapshot_id: str) -> int:
        assert self._snaps is not None
        try:
            self.flush()
            with self._lock:
                freed = self._snaps.delete(snapshot_id)
        except OSError as exc:
            _reraise(exc, self.server)
        log.info("replica %s: snapshot %s deleted, %d bytes freed", self.volume_id,
                 snapshot_id, freed)
        return freed

    def _changed_chunks(self, since: str, until: str) -> list[int]:
        per_chunk = CHUNK_SIZE // BLOCK_SIZE
        if self._snaps is None or not since and not until:  # the chunks holding data now
            sums, step = self._sums_map, per_chunk * 4
            zeros = bytes(step)
            return [k for k in range(chunk_count(self.size))
                    if sums[k * step : (k + 1) * step] != zeros[: len(sums) - k * step]]
        return sorted({b // per_chunk for b in self._changed_blocks(since, until)})

    def _changed_blocks(self, since: str, until: str) -> set[int]:
        snaps = self._snaps
        assert snaps is not None  # changed_blocks knows both snapshots: some were taken
        until_number = snaps.find(until).number if until else 0
        if since:
            return snaps.written_between(snaps.find(since).number, until_number)
        return snaps.held_by(until_number, self._sums)

    def _read_snapshot(self, snapshot_id: str, offset: int, length: int) -> bytes:
        assert self._snaps is not None
        number = self._snaps.find(snapshot_id).number
        data, crcs = self._snaps.read_snapshot(number, offset // BLOCK_SIZE,
                                               length // BLOCK_SIZE, self._sums)
        return self._verify(offset, data, crcs)

    def start_writeback(self) -> None:
        # First, so that writes landing meanwhile count for next time. The event loop thread
        # adds to the set: a chunk it adds during the swap lands in the old set, which
        # sorted() below copies in one step under the GIL, or in the new one.
        w = self._w
        touched, w.small_chunks = w.small_chunks, set()
        w.small_writes = 0
        with self._lock:
            if self._closed:
                return
            try:
                for first, count in runs(sorted(touched)):
                    start_writing(self._data_fd, first * CHUNK_SIZE, count * CHUNK_SIZE)
                start_writing(self._sums_fd)
                if self._snaps is not None:
                    self._snaps.start_writeback()
                start_writing(self._gens_fd)
            except OSError as exc:  # the next flush reports it (and fails)
                log.warning("replica %s: starting writeback failed: %s", self.volume_id, exc)

    def _grow(self, size: int) -> None:
        """Lengthen data, sums and gens (sparse), then record the size in meta.json.

        The files are lengthened and fsynced first and meta.json is replaced last, so a
        crash leaves either the old size (files longer than needed, cut back at the next
        open) or the new one. The maps are swapped under the flush lock.
        """
        blocks, chunk_total = size // BLOCK_SIZE, chunk_count(size)
        old = (self.size, self._blocks * 4, chunk_count(self.size) * 8)
        fds = (self._data_fd, self._sums_fd, self._gens_fd)
        try:
            for fd, length in zip(fds, (size, blocks * 4, chunk_total * 8), strict=True):
                os.ftruncate(fd, length)
                os.fsync(fd)
            meta = {"volume_id": self.volume_id, "size": size, "epoch": self._epoch}
            write_json_atomic(self._path / "meta.json", meta)
        except OSError as exc:
            for fd, length in zip(fds, old, strict=True):
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, length)
            if exc.errno == errno.EFBIG:
                raise InvalidArgument(
                    what="size", detail=f"{size} is too big for this filesystem"
                ) from exc
            _reraise(exc, self.server)
        with self._lock:
            sums_map = mmap.mmap(self._sums_fd, blocks * 4, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
            gens_map = mmap.mmap(self._gens_fd, chunk_total * 8, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
            self._unmap("grow")
            self._sums_map, self._gens_map = sums_map, gens_map
            self._sums = memoryview(sums_map).cast("I")
            self._gens = memoryview(gens_map).cast("Q")
            self._blocks = blocks
            if self._snaps is not None:
                self._snaps.grow(blocks)
            self._sums_backed.extend(bytes(_pages(blocks * 4) - len(self._sums_backed)))
            self._gens_backed.extend(bytes(_pages(chunk_total * 8) - len(self._gens_backed)))
            self.size = size  # (grow sets it too, after this)
            self._w = self._writer(self._w)
        log.info("grew replica %s to %d bytes", self.volume_id, size)

    def _unmap(self, when: str) -> None:
        """Drop the checksum and generation maps (their views first)."""
        self._w.close()
        self._sums.release()
        self._gens.release()
        for mapped in (self._sums_map, self._gens_map):
            try:
                mapped.close()
            except BufferError:  # a view still exported: the GC unmaps it later
                log.warning("replica %s: mmap still in use at %s", self.volume_id, when)

    def _generations(self, first: int, end: int) -> bytes:
        if sys.byteorder == "little":
            return self._gens_map[first * 8 : end * 8]
        return le_u64(self._gens[first:end])

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            volume_id=self.volume_id,
            size=self.size,
            used=os.fstat(self._data_fd).st_blocks * 512 + (
                0 if self._snaps is None else self._snaps.used()),
            epoch=self._epoch,
            chunks_written=self._w.chunks_written,
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._unmap("close")
            if self._snaps is not None:
                self._snaps.close()
            for fd in (self._data_fd, self._sums_fd, self._gens_fd, self._epoch_fd):
                if fd >= 0:
                    os.close(fd)


class DiskChunkStore(ChunkStore):
    """Replicas under ``root``: ``server.json`` and ``replicas/<volume id>/``.

    Each replica directory holds a sparse ``data`` file, ``sums`` (u32 CRC32 per block,
    host byte order), ``gens`` (u64 generation per chunk, host byte order), ``epoch`` (the
    fencing epoch, overwritten in place: see ``EPOCH_FILE``) and ``meta.json`` (size; the
    epoch as of the last grow). Creating and deleting go through a hidden temporary directory and a
    rename, so a crash never leaves a half-made replica under its real name.
    """

    def __init__(self, root: Path, reserve: int = 0) -> None:
        """``reserve``: bytes of free space kept for chunks in use (``SpaceReserve``; -1:
        1% of the disk, 0: none)."""
        self.root = Path(root)
        self._replicas_dir = self.root / REPLICAS_DIR
        self._replicas_dir.mkdir(parents=True, exist_ok=True)
        self.space = SpaceReserve(self.root, reserve)
        self._server_file = self.root / "server.json"
        if self._server_file.exists():
            self._server: dict[str, Any] = json.loads(self._server_file.read_text())
        else:
            self._server = {"id": uuid.uuid4().hex}
            write_json_atomic(self._server_file, self._server)
        self._sizes: dict[str, int] = {}
        for entry in self._replicas_dir.iterdir():
            if entry.name.startswith("."):
                log.info("removing leftover %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                meta = json.loads((entry / "meta.json").read_text())
                self._sizes[entry.name] = int(meta["size"])
            except (OSError, ValueError, KeyError):
                log.error("ignoring damaged replica directory %s", entry)
        self._open: dict[str, DiskReplica] = {}
        self._purges: list[threading.Thread] = []

    @property
    def server_id(self) -> str:
        return str(self._server["id"])

    def refresh_space(self) -> None:
        self.space.refresh()

    def reserve(self) -> int:
        return self.space.reserve

    def server_record(self) -> dict[str, Any]:
        """The contents of server.json (the id, plus what the data server keeps there)."""
        return dict(self._server)

    def update_server_record(self, **fields: Any) -> None:
        record = {**self._server, **fields, "id": self.server_id}
        write_json_atomic(self._server_file, record)
        self._server = record

    def create(self, volume_id: str, size: int) -> StoredReplica:
        check_volume_id(volume_id)
        self._check_size(size)
        if volume_id in self._sizes:
            check_existing_size(volume_id, self._sizes[volume_id], size)
            return self.replica(volume_id)
        tmp = self._replicas_dir / f".create-{volume_id}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            self._make_file(tmp / "data", size)
            self._make_file(tmp / "sums", size // BLOCK_SIZE * 4)
            self._make_file(tmp / "gens", chunk_count(size) * 8)
            make_epoch_file(tmp / EPOCH_FILE, 0)
            write_json_atomic(
                tmp / "meta.json", {"volume_id": volume_id, "size": size, "epoch": 0}
            )
            os.rename(tmp, self._replicas_dir / volume_id)
            fsync_dir(self._replicas_dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.EFBIG:
                raise InvalidArgument(
                    what="size", detail=f"{size} is too big for this filesystem"
                ) from exc
            _reraise(exc, self.server_id)
        self._sizes[volume_id] = size
        log.info("created replica %s (%d bytes)", volume_id, size)
        return self.replica(volume_id)

    @staticmethod
    def _make_file(path: Path, size: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        replica = self._open.pop(volume_id, None)
        if replica is not None:
            replica.close()
        path = self._replicas_dir / volume_id
        if not path.exists():
            self._sizes.pop(volume_id, None)
            return
        trash = self._replicas_dir / f".delete-{volume_id}-{secrets.token_hex(4)}"
        os.rename(path, trash)
        fsync_dir(self._replicas_dir)
        self._sizes.pop(volume_id, None)
        # freeing a big file's extents can take seconds: not on the caller's (event loop's)
        # time. A crash before the end leaves the hidden directory, removed at the next start.
        purge = threading.Thread(
            target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, daemon=True
        )
        purge.start()
        self._purges = [t for t in self._purges if t.is_alive()] + [purge]
        log.info("deleted replica %s", volume_id)

    def replica(self, volume_id: str) -> StoredReplica:
        replica = self._open.get(volume_id)
        if replica is not None:
            return replica
        check_volume_id(volume_id)
        if volume_id not in self._sizes:
            raise ReplicaNotFound(server=self.server_id, volume_id=volume_id)
        replica = DiskReplica(self._replicas_dir / volume_id, volume_id, self.server_id,
                              self.space)
        self._open[volume_id] = replica
        return replica

    def grow(self, volume_id: str, size: int) -> int:
        check_volume_id(volume_id)
        self._check_size(size)
        grown = self.replica(volume_id).grow(size)
        self._sizes[volume_id] = grown
        return grown

    def replica_ids(self) -> list[str]:
        return sorted(self._sizes)

    def capacity(self) -> int:
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def used(self) -> int:
        total = 0
        for volume_id in self._sizes:
            for name in ("data", "extra"):  # extra: the blocks snapshots moved
                try:
                    total += (self._replicas_dir / volume_id / name).stat().st_blocks * 512
                except OSError:
                    pass
        return total

    def provisioned(self) -> int:
        return sum(self._sizes.values())

    def open_replicas(self) -> list[StoredReplica]:
        return list(self._open.values())

    def close(self) -> None:
        while self._open:
            _, replica = self._open.popitem()
            replica.close()
        for purge in self._purges:
            purge.join()
        self._purges = []


