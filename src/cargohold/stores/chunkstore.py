"""Replica storage on a data server: the interface and its memory reference.

The disk store, the one data servers run, is :mod:`cargohold.stores.diskstore`.

A *replica* is one server's copy of a whole volume. Its bytes are addressed like a block
device: every offset and length is a multiple of ``BLOCK_SIZE`` and lies inside the volume.
Each block carries a CRC32 (``0`` = never written: the block reads as zeros) and each
``CHUNK_SIZE`` chunk carries the highest generation of the writes that touched it, so that
replicas can be compared chunk by chunk after a failure.

Durability: ``write`` and ``trim`` return once the data is in the page cache; ``flush`` makes
everything written before it durable. A crash before a flush may leave a block whose data and
checksum disagree: reading it raises ``ChecksumMismatch`` and the engine repairs it from
another replica, exactly as for a corrupted block.

Fencing: a replica remembers the highest epoch it has seen (durably). ``fence`` with a lower
epoch raises ``Fenced``; the data server fences every I/O request with its epoch first.

StoredReplica objects are cached by the store and must not be used after ``delete`` or ``close``.
``flush`` may run in a worker thread while the event loop thread keeps reading and writing
the same replica; every other method belongs to one thread.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from abc import ABC, abstractmethod
from array import array
from dataclasses import asdict, dataclass
from typing import Any

from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE, chunk_count, chunks, data_runs
from cargohold.errors import (
    ChecksumMismatch,
    Fenced,
    InvalidArgument,
    NoSpace,
    ReplicaNotFound,
    SnapshotNotFound,
    TooManySnapshots,
)

try:  # the same CRC-32 as zlib's, computed with SIMD instructions: ~3x faster per block
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is optional
    from zlib import crc32

log = logging.getLogger(__name__)

BytesLike = bytes | bytearray | memoryview

_VOLUME_ID = re.compile(r"^[0-9a-f]{32}$")
ZERO_BLOCK = bytes(BLOCK_SIZE)
_MAX_U64 = (1 << 64) - 1
#: Snapshots a replica keeps at most (each costs only the blocks written since).
MAX_SNAPSHOTS = 1024


@dataclass(frozen=True)
class ReplicaInfo:
    volume_id: str
    size: int  # bytes
    used: int  # bytes of storage the data takes (thin: never-written blocks cost nothing)
    epoch: int
    chunks_written: int  # chunks with a generation above 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    number: int  # the n-th snapshot taken of this replica
    created: float  # unix time, given by whoever took it
    unique: int  # bytes of data only this snapshot holds: what deleting it frees

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_volume_id(volume_id: str, what: str = "volume id") -> None:
    if not isinstance(volume_id, str) or not _VOLUME_ID.match(volume_id) \
            or volume_id == "0" * 32:
        raise InvalidArgument(what=what, detail=f"{volume_id!r} is not 32 hex characters")


def block_checksum(block: BytesLike) -> int:
    """A block's stored checksum: its CRC32, with 0 kept free to mean 'never written'."""
    return crc32(block) or 1


# --- the interface ---------------------------------------------------------------------


class StoredReplica(ABC):
    """One volume's copy on this server. Offsets and lengths are in bytes."""

    def __init__(self, volume_id: str, size: int, server: str) -> None:
        self.volume_id = volume_id
        self.size = size
        self.server = server

    @property
    @abstractmethod
    def epoch(self) -> int:
        """The highest epoch this replica has seen (0 before the first fence)."""

    def fence(self, epoch: int) -> None:
        """Raise the stored epoch to ``epoch`` durably; a lower epoch raises ``Fenced``."""
        current = self.epoch
        if epoch < current:
            raise Fenced(volume_id=self.volume_id, epoch=epoch, current=current)
        if epoch > current:
            if epoch > _MAX_U64:
                raise InvalidArgument(what="epoch", detail=f"{epoch} does not fit in 64 bits")
            self._store_epoch(epoch)

    def read(self, offset: int, length: int) -> bytes:
        """The bytes at ``[offset, offset+length)``, every block verified.

        Never-written and trimmed blocks read as zeros; the first block whose checksum does not
        match raises ``ChecksumMismatch`` carrying its byte offset.
        """
        self._check_range(offset, length)
        if not length:
            return b""
        return self._read(offset, length)

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """``read``, if the bytes are all in memory already; None if reading them would wait
        for a disk (the caller reads in a thread meanwhile). Raises as ``read`` does."""
        self._check_range(offset, length)
        if not length:
            return b""
        try:
            return self._read(offset, length, nowait=True)
        except BlockingIOError:
            return None

    def read_place(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, offset in it) of the raw bytes of ``[offset, offset+length)`` when they lie
        in one file, for a read done elsewhere that ``read_verified`` then checks; None when
        they do not (in memory, or blocks moved by snapshots): ``read`` them. Checks the
        range as ``read`` does."""
        self._check_range(offset, length)
        return None

    def read_verified(self, offset: int, length: int, raw: bytes) -> bytes:
        """``read``'s answer from ``raw``, the bytes read at ``read_place`` (fewer at the
        file's end): every block checked (ChecksumMismatch), never-written ones as zeros."""
        raise NotImplementedError(f"{type(self).__name__} has no read_place")

    def write(self, offset: int, data: BytesLike, generation: int) -> None:
        """Store ``data`` at ``offset`` and record ``generation`` on every chunk it touches.

        A chunk keeps the highest generation ever written to it. Out of space raises
        ``NoSpace``; the blocks of a failed write then hold either old or new data, each with
        a matching checksum.
        """
        view = memoryview(data)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")
        length = len(view)
        self._check_range(offset, length)
        self._check_generation(generation)
        if length:
            self._write(offset, view, generation)

    def fast_io(self) -> object | None:
        """The compiled ``BlockIO`` (stores/_blockio.c) that may serve this replica's plain
        writes and cached reads without Python, while it is open
        (adapters/dataserver/fastio.py); None if there is none."""
        return None

    def fill(self, offset: int, data: BytesLike, generation: int) -> bool:
        """Write ``data``, at most one chunk from a chunk's start, only if that chunk was
        never written (generation 0); return whether it was. A clone's first contents,
        copied in while its writer may already write: what the writer wrote is never
        overwritten. Blocks of zeros stay holes; the generation is recorded either way."""
        view = memoryview(data).cast("B")
        if offset % CHUNK_SIZE or len(view) > CHUNK_SIZE or len(view) % BLOCK_SIZE:
            raise InvalidArgument(what="fill", detail="at most one chunk, from its start, "
                                  "in whole blocks")
        self._check_range(offset, len(view))
        self._check_generation(generation)
        if not len(view) or self.generations(offset // CHUNK_SIZE, 1) != bytes(8):
            return False
        runs = data_runs(view)
        if not runs:  # a chunk of zeros: nothing to store, but it is filled
            self._trim(offset, len(view), generation, False)
        for at, length in runs:
            self._write(offset + at, view[at:at + length], generation)
        return True

    def trim(self, offset: int, length: int, generation: int = 0, *,
             every_chunk: bool = False) -> None:
        """Deallocate ``[offset, offset+length)``: it reads as zeros and costs no space.

        ``generation`` is recorded like a write's, but only on chunks written before: a
        chunk never written is a hole on every copy in sync, and keeps generation 0 (so a
        trim of free space neither counts as written nor needs room for generations).
        ``every_chunk`` records it on all of them: zeros copied from a replica where the
        chunk was written and then trimmed.
        """
        self._check_range(offset, length)
        self._check_generation(generation)
        if length:
            self._trim(offset, length, generation, not every_chunk)

    def copied(self, offset: int, length: int) -> None:
        """``[offset, offset+length)`` was just written by a bulk copy (a restore, a
        clone's fill, a rebuild): data no one reads soon, which a store that caches may
        let go of. The memory store keeps everything."""
        return None

    @abstractmethod
    def flush(self) -> None:
        """Make every write and trim done before this call durable (thread safe)."""

    # --- snapshots ---------------------------------------------------------------------

    def take_snapshot(self, snapshot_id: str, created: float) -> SnapshotInfo:
        """Keep the replica's current contents as snapshot ``snapshot_id``, durably.

        Every write and trim done before this call is in it; none done after. The same id
        again returns the snapshot taken before (idempotent). Keeping more than
        ``MAX_SNAPSHOTS`` raises ``TooManySnapshots``. Taking one copies no data: blocks
        written afterwards go elsewhere (see the store's format).
        """
        check_volume_id(snapshot_id, what="snapshot id")
        ids = self.snapshot_ids()
        if snapshot_id not in ids:
            if len(ids) >= MAX_SNAPSHOTS:
                raise TooManySnapshots(name=self.volume_id, count=MAX_SNAPSHOTS)
            # (not ``snapshots()``: what each holds alone costs a pass over all versions,
            # and the writer holds its writes; a new one holds nothing alone)
            return self._take_snapshot(snapshot_id, created)
        return next(s for s in self.snapshots() if s.id == snapshot_id)

    @abstractmethod
    def snapshot_ids(self) -> list[str]:
        """The ids of the snapshots kept, oldest first."""

    @abstractmethod
    def snapshots(self) -> list[SnapshotInfo]:
        """The snapshots kept, oldest first, with the space each holds alone."""

    def delete_snapshot(self, snapshot_id: str) -> int:
        """Forget a snapshot and free the data only it held; return the bytes freed.

        A snapshot not kept is a no-op (0).
        """
        check_volume_id(snapshot_id, what="snapshot id")
        if snapshot_id not in self.snapshot_ids():
            return 0
        return self._delete_snapshot(snapshot_id)

    def read_snapshot(self, snapshot_id: str, offset: int, length: int) -> bytes:
        """The bytes of ``[offset, offset+length)`` as snapshot ``snapshot_id`` holds them,
        every block verified (``ChecksumMismatch`` as for ``read``); ``SnapshotNotFound``.
        """
        check_volume_id(snapshot_id, what="snapshot id")
        if snapshot_id not in self.snapshot_ids():
            raise SnapshotNotFound(name=snapshot_id)
        self._check_range(offset, length)
        if not length:
            return b""
        return self._read_snapshot(snapshot_id, offset, length)

    def scrub_snapshots(self) -> list[tuple[str, int]]:
        """Read every block the snapshots hold apart from the head (thread safe: a worker
        thread may run it while the replica is written); return, for each whose checksum
        fails, a snapshot that holds it and its byte offset."""
        return []

    def repair_snapshot(self, snapshot_id: str, offset: int, data: BytesLike) -> None:
        """Write back the block snapshot ``snapshot_id`` holds at ``offset`` from a good
        copy (``data``, which must match the checksum recorded for it); a block the head
        still shares is the head's to repair (a write), and is left alone here."""
        raise InvalidArgument(what="repair", detail="this store keeps no snapshot blocks apart")

    def changed_chunks(self, since: str = "", until: str = "") -> list[int]:
        """The chunks whose contents may differ between snapshot ``since`` ("": an empty
        volume) and snapshot ``until`` ("": the replica as it is now), in order. What a
        copy must move to bring a replica holding ``since`` to ``until``."""
        self._known(since, until)
        return self._changed_chunks(since, until)

    def _known(self, *snapshot_ids: str) -> None:
        for snapshot_id in snapshot_ids:
            if snapshot_id:
                check_volume_id(snapshot_id, what="snapshot id")
                if snapshot_id not in self.snapshot_ids():
                    raise SnapshotNotFound(name=snapshot_id)

    def changed_blocks(self, since: str, until: str = "") -> list[int]:
        """The 4 KiB blocks that may differ between snapshot ``since`` and snapshot
        ``until`` ("": the replica now), in order: what a copy that holds ``since`` lacks,
        finer than ``changed_chunks``."""
        if not since:
            raise InvalidArgument(what="since", detail="blocks are told against a snapshot")
        self._known(since, until)
        return sorted(self._changed_blocks(since, until))

    @abstractmethod
    def _changed_chunks(self, since: str, until: str) -> list[int]: ...

    @abstractmethod
    def _changed_blocks(self, since: str, until: str) -> set[int]: ...

    def revert(self, snapshot_id: str, generation: int) -> int:
        """Make the replica read as snapshot ``snapshot_id`` again, durably; return the
        bytes that changed.

        Each block that differs is written back (a block of zeros is trimmed) with
        ``generation``, so later snapshots keep what they hold and replicas reverted alike
        stay alike. Blocks that fail their checksum are written back too.
        """
        self._check_generation(generation)
        if snapshot_id not in self.snapshot_ids():
            raise SnapshotNotFound(name=snapshot_id)
        changed = 0
        for offset in range(0, self.size, CHUNK_SIZE):
            length = min(CHUNK_SIZE, self.size - offset)
            want = self.read_snapshot(snapshot_id, offset, length)
            try:
                have: bytes | None = self.read(offset, length)
            except ChecksumMismatch:
                have = None
            if have == want:
                continue
            for at in range(0, length, BLOCK_SIZE):
                block = want[at : at + BLOCK_SIZE]
                if have is not None and have[at : at + BLOCK_SIZE] == block:
                    continue
                if block == ZERO_BLOCK:
                    self.trim(offset + at, BLOCK_SIZE, generation)
                else:
                    self.write(offset + at, block, generation)
                changed += BLOCK_SIZE
        self.flush()
        return changed

    @abstractmethod
    def _take_snapshot(self, snapshot_id: str, created: float) -> SnapshotInfo: ...

    @abstractmethod
    def _delete_snapshot(self, snapshot_id: str) -> int: ...

    @abstractmethod
    def _read_snapshot(self, snapshot_id: str, offset: int, length: int) -> bytes: ...

    #: Writes smaller than ``SMALL_WRITE`` since the last ``start_writeback`` (the data
    #: server's timer asks): each is likely a disk write of its own at the next flush.
    small_writes = 0

    def start_writeback(self) -> None:  # noqa: B027 - a store in memory has nothing to do
        """Start writing to disk the chunks small writes went to, without waiting (thread
        safe; large writes are left to the kernel: they flush at disk speed).

        Called every ``WRITEBACK_INTERVAL`` by the data server, so that a flush finds few
        scattered pages left to write: the file system in the volume flushes every few
        seconds, and the loop device holds every other request of the volume while it does.
        """

    def reclaim(self, runs_at_most: int) -> int:  # noqa: B027 - nothing left in memory
        """Free a little more of the space deleted snapshots held (thread safe): at most
        ``runs_at_most`` runs of blocks; return the bytes freed (0: nothing left)."""
        return 0

    def grow(self, size: int) -> int:
        """Make the replica at least ``size`` bytes long; return its size afterwards.

        Growing never touches existing data: the new range reads as zeros and costs no
        space (thin). A replica already that big (or bigger) is left as it is, so growing is
        idempotent and never shrinks. The new size is durable before this returns.
        """
        ChunkStore._check_size(size)
        if size > self.size:
            self._grow(size)
            self.size = size
        return self.size

    @abstractmethod
    def _grow(self, size: int) -> None: ...

    def generations(self, first: int = 0, count: int | None = None) -> bytes:
        """Chunk generations as little-endian u64s (8 bytes per chunk).

        ``count`` chunks from chunk ``first`` (all the rest when ``count`` is None; fewer at
        the end of the volume).
        """
        total = chunk_count(self.size)
        if not 0 <= first <= total or (count is not None and count < 0):
            raise InvalidArgument(
                what="chunk range", detail=f"first {first} count {count} of {total} chunks"
            )
        end = total if count is None else min(total, first + count)
        return self._generations(first, end)

    @abstractmethod
    def _generations(self, first: int, end: int) -> bytes: ...

    @abstractmethod
    def info(self) -> ReplicaInfo:
        """Size, used space, epoch and written chunks."""

    @abstractmethod
    def _store_epoch(self, epoch: int) -> None: ...

    @abstractmethod
    def _read(self, offset: int, length: int, nowait: bool = False) -> bytes:
        """With ``nowait``, BlockingIOError rather than wait for a disk."""

    @abstractmethod
    def _write(self, offset: int, data: memoryview, generation: int) -> None: ...

    @abstractmethod
    def _trim(self, offset: int, length: int, generation: int, written_only: bool) -> None: ...

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise InvalidArgument(what="range", detail=f"offset {offset} length {length}")
        if offset % BLOCK_SIZE or length % BLOCK_SIZE:
            raise InvalidArgument(
                what="range",
                detail=f"offset {offset} and length {length} must be multiples of {BLOCK_SIZE}",
            )
        if offset + length > self.size:
            raise InvalidArgument(
                what="range",
                detail=f"[{offset}, {offset + length}) ends beyond the volume size {self.size}",
            )

    @staticmethod
    def _check_generation(generation: int) -> None:
        if not 0 <= generation <= _MAX_U64:
            raise InvalidArgument(what="generation", detail=f"{generation} is not a u64")


class ChunkStore(ABC):
    """All replicas held by one data server (one disk or directory)."""

    @property
    @abstractmethod
    def server_id(self) -> str:
        """A stable id for this data server (32 hex characters)."""

    @abstractmethod
    def create(self, volume_id: str, size: int) -> StoredReplica:
        """Create an empty (all zeros, thin) replica; the same call again is a no-op.

        A replica of another size already there raises ``InvalidArgument``.
        """

    @abstractmethod
    def delete(self, volume_id: str) -> None:
        """Remove a replica and its space; deleting a missing replica is a no-op."""

    @abstractmethod
    def replica(self, volume_id: str) -> StoredReplica:
        """The replica of ``volume_id``, or ``ReplicaNotFound``."""

    @abstractmethod
    def grow(self, volume_id: str, size: int) -> int:
        """Grow the replica of ``volume_id`` to at least ``size`` bytes; return its size.

        Never shrinks (see ``StoredReplica.grow``); a missing replica raises ``ReplicaNotFound``.
        """

    @abstractmethod
    def replica_ids(self) -> list[str]: ...

    def refresh_space(self) -> None:  # noqa: B027 - most stores keep no reserve
        """Read the free space again, for a store that keeps a reserve (none here)."""

    def reserve(self) -> int:
        """Bytes of free space kept for writes into chunks in use (none here)."""
        return 0

    @abstractmethod
    def capacity(self) -> int:
        """Total bytes of the underlying storage."""

    @abstractmethod
    def free(self) -> int:
        """Bytes still available for data."""

    @abstractmethod
    def used(self) -> int:
        """Bytes taken by all replicas' data."""

    @abstractmethod
    def provisioned(self) -> int:
        """Sum of all replicas' sizes."""

    @abstractmethod
    def open_replicas(self) -> list[StoredReplica]:
        """Replicas currently open (the ones a shutdown flush must cover)."""

    @abstractmethod
    def close(self) -> None:
        """Release every open replica; the store must not be used afterwards."""

    @staticmethod
    def _check_size(size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidArgument(what="size", detail=f"{size!r} is not a positive integer")
        if size % BLOCK_SIZE:
            raise InvalidArgument(what="size", detail=f"{size} is not a multiple of {BLOCK_SIZE}")


def check_existing_size(volume_id: str, existing: int, size: int) -> None:
    if existing != size:
        raise InvalidArgument(
            what="size",
            detail=f"a replica of {volume_id} exists with size {existing}, not {size}",
        )


# --- memory reference ------------------------------------------------------------------


class MemoryReplica(StoredReplica):
    def __init__(self, volume_id: str, size: int, server: str, store: MemoryChunkStore) -> None:
        super().__init__(volume_id, size, server)
        self._store = store
        self._blocks: dict[int, bytes] = {}  # block index -> data (absent: zeros)
        self._sums: dict[int, int] = {}  # block index -> crc
        self._gens = [0] * chunk_count(size)
        self._epoch = 0
        # snapshot id -> (number, created, blocks, sums): the dicts share the bytes objects
        # of blocks not written since, as the disk store shares their place on disk
        self._snapshots: dict[str, tuple[int, float, dict[int, bytes], dict[int, int]]] = {}
        self._seq = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def _store_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _read(self, offset: int, length: int, nowait: bool = False) -> bytes:
        return self._read_from(self._blocks, self._sums, offset, length)

    def _read_from(self, blocks: dict[int, bytes], sums: dict[int, int], offset: int,
                   length: int) -> bytes:
        first = offset // BLOCK_SIZE
        out = []
        for index in range(first, first + length // BLOCK_SIZE):
            block = blocks.get(index)
            if block is None:
                out.append(ZERO_BLOCK)
                continue
            if block_checksum(block) != sums[index]:
                raise ChecksumMismatch(
                    volume_id=self.volume_id, offset=index * BLOCK_SIZE, server=self.server
                )
            out.append(block)
        return b"".join(out)

    def _write(self, offset: int, data: memoryview, generation: int) -> None:
        first = offset // BLOCK_SIZE
        count = len(data) // BLOCK_SIZE
        new = sum(1 for i in range(first, first + count) if i not in self._blocks)
        if new and self._store.free() < new * BLOCK_SIZE:
            raise NoSpace(server=self.server, detail="memory store capacity reached")
        for k in range(count):
            block = bytes(data[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE])
            self._blocks[first + k] = block
            self._sums[first + k] = block_checksum(block)
        self._store._used += new * BLOCK_SIZE
        self._record(offset, len(data), generation)

    def _trim(self, offset: int, length: int, generation: int, written_only: bool) -> None:
        first, end = offset // BLOCK_SIZE, (offset + length) // BLOCK_SIZE
        if end - first > len(self._blocks):  # a big trim: visit only the stored blocks
            doomed = [i for i in self._blocks if first <= i < end]
        else:
            doomed = [i for i in range(first, end) if i in self._blocks]
        for index in doomed:
            del self._blocks[index]
            self._sums.pop(index, None)
        self._store._used -= len(doomed) * BLOCK_SIZE
        self._record(offset, length, generation, written_only)

    def _record(self, offset: int, length: int, generation: int,
                written_only: bool = False) -> None:
        for chunk in chunks(offset, length):
            if written_only and not self._gens[chunk]:
                continue
            if generation > self._gens[chunk]:
                self._gens[chunk] = generation

    def flush(self) -> None:
        pass

    def snapshot_ids(self) -> list[str]:
        return sorted(self._snapshots, key=lambda s: self._snapshots[s][0])

    def snapshots(self) -> list[SnapshotInfo]:
        found = []
        for snapshot_id in self.snapshot_ids():
            number, created, blocks, _ = self._snapshots[snapshot_id]
            others = [self._blocks] + [
                b for s, (_, _, b, _) in self._snapshots.items() if s != snapshot_id]
            alone = sum(1 for index, block in blocks.items()
                        if all(o.get(index) is not block for o in others))
            found.append(SnapshotInfo(snapshot_id, number, created, alone * BLOCK_SIZE))
        return found

    def _take_snapshot(self, snapshot_id: str, created: float) -> SnapshotInfo:
        self._seq += 1
        self._snapshots[snapshot_id] = (self._seq, created, dict(self._blocks),
                                        dict(self._sums))
        return SnapshotInfo(snapshot_id, self._seq, created, 0)

    def _delete_snapshot(self, snapshot_id: str) -> int:
        freed = next(s.unique for s in self.snapshots() if s.id == snapshot_id)
        del self._snapshots[snapshot_id]
        return freed

    def _read_snapshot(self, snapshot_id: str, offset: int, length: int) -> bytes:
        _, _, blocks, sums = self._snapshots[snapshot_id]
        return self._read_from(blocks, sums, offset, length)

    def _changed_chunks(self, since: str, until: str) -> list[int]:
        return sorted({i * BLOCK_SIZE // CHUNK_SIZE for i in self._changed_blocks(since, until)})

    def _changed_blocks(self, since: str, until: str) -> set[int]:
        old = self._snapshots[since][2] if since else {}
        new = self._snapshots[until][2] if until else self._blocks
        return {i for i in old.keys() | new.keys() if old.get(i) is not new.get(i)}

    def _grow(self, size: int) -> None:
        self._gens.extend([0] * (chunk_count(size) - len(self._gens)))

    def _generations(self, first: int, end: int) -> bytes:
        return le_u64(self._gens[first:end])

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            volume_id=self.volume_id,
            size=self.size,
            used=len({(i, id(b)) for s in [self._blocks] + [
                snap[2] for snap in self._snapshots.values()] for i, b in s.items()
            }) * BLOCK_SIZE,
            epoch=self._epoch,
            chunks_written=sum(1 for g in self._gens if g),
        )

    def corrupt(self, offset: int) -> None:
        """Flip a bit in the block at ``offset`` (tests: what a bad disk does)."""
        index = offset // BLOCK_SIZE
        if index not in self._blocks:
            self._store._used += BLOCK_SIZE
        block = bytearray(self._blocks.get(index, ZERO_BLOCK))
        block[0] ^= 1
        self._blocks[index] = bytes(block)
        self._sums.setdefault(index, block_checksum(ZERO_BLOCK))


class MemoryChunkStore(ChunkStore):
    """The reference implementation, kept in memory (unit tests, engine tests)."""

    def __init__(self, capacity: int = 1 << 40, server_id: str = "") -> None:
        self._server_id = server_id or uuid.uuid4().hex
        self._capacity = capacity
        self._used = 0
        self._replicas: dict[str, MemoryReplica] = {}

    @property
    def server_id(self) -> str:
        return self._server_id

    def create(self, volume_id: str, size: int) -> StoredReplica:
        check_volume_id(volume_id)
        self._check_size(size)
        existing = self._replicas.get(volume_id)
        if existing is not None:
            check_existing_size(volume_id, existing.size, size)
            return existing
        replica = MemoryReplica(volume_id, size, self._server_id, self)
        self._replicas[volume_id] = replica
        return replica

    def delete(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        replica = self._replicas.pop(volume_id, None)
        if replica is not None:
            self._used -= replica.info().used

    def replica(self, volume_id: str) -> StoredReplica:
        replica = self._replicas.get(volume_id)
        if replica is None:
            raise ReplicaNotFound(server=self._server_id, volume_id=volume_id)
        return replica

    def grow(self, volume_id: str, size: int) -> int:
        check_volume_id(volume_id)
        self._check_size(size)
        return self.replica(volume_id).grow(size)

    def replica_ids(self) -> list[str]:
        return sorted(self._replicas)

    def capacity(self) -> int:
        return self._capacity

    def free(self) -> int:
        return self._capacity - self._used

    def used(self) -> int:
        return self._used

    def provisioned(self) -> int:
        return sum(r.size for r in self._replicas.values())

    def open_replicas(self) -> list[StoredReplica]:
        return list(self._replicas.values())

    def close(self) -> None:
        pass




def le_u64(values: Any) -> bytes:
    out = array("Q", values)
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()
