"""Snapshots of a replica on disk: redirect-on-write of 4 KiB blocks (the on-disk format).

A replica's ``data`` file holds each block at its *home*, its own offset in the volume. Once
a snapshot holds a block, a write to it does not overwrite it: the new data goes to a *slot*
of the ``extra`` file, and the old place becomes a *version* that only snapshots read. So
taking a snapshot copies nothing, the first write after it costs what any write costs (the
granularity is the 4 KiB block the loop device writes: nothing beside it is copied), and
the data a snapshot holds is never written while the snapshot is kept. Where a block's head
(what the volume reads now) lies is one lookup in ``heads``; a snapshot's block is found in
that block's own list of versions. Neither cost grows with the number of snapshots.

Files, made at the first snapshot (``snapshots.json`` last: its presence turns this on):

- ``snapshots.json``: ``seq`` (snapshots ever taken) and the snapshots kept (id, number,
  created). Snapshot number n is the n-th taken.
- ``heads``: two u32 per block: where the head lies (``HOME``, ``NOWHERE``: no data, reads
  as zeros, or k >= 1: slot k-1 of ``extra``) and its birth (``seq`` when it was written).
  A *private* map: its pages reach the disk only in ``flush``, after the versions they
  refer to, so a crash never leaves a head that was moved away from data no version names.
- ``versions``: an append-only log of records (block, birth, death, location, crc32 of the
  data, crc32 of the record): the data at ``location`` was the block's head from the write
  at ``birth`` until the write at ``death``; snapshot n holds it when birth < n <= death.
  It is written through a shared map, in room allocated ahead (zeros, which end it): a
  record costs a copy, not a system call, and is in the page cache at once, so it outlives
  a crash of the process as a write does.
- ``extra``: the slots, 4 KiB each, reused once free.

Deleting a snapshot drops the versions no other kept snapshot holds, after making the
deletion durable, and punches their blocks. Only versions superseded between it and the next
kept snapshot can be held by it alone: they are found by the seq that superseded them (the
index ``_by_death``), so a deletion costs what was written around that snapshot, not what
the volume holds. Their records stay in the log, held by no snapshot, until it is rewritten
(when most of it is such records); a record held by no snapshot is skipped at load, and its
place punched unless something uses it now.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import mmap
import os
import struct
import threading
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cargohold.core.layout import BLOCK_SIZE, runs
from cargohold.errors import SnapshotNotFound
from cargohold.stores.sparsefile import fsync_dir, punch_hole, start_writing, write_json_atomic

try:  # the same CRC-32 as zlib's, computed with SIMD instructions
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is optional
    from zlib import crc32

log = logging.getLogger(__name__)

SNAPSHOTS_FILE = "snapshots.json"
FILES = ("heads", "versions", "extra")  # made before SNAPSHOTS_FILE
HOME = 0
NOWHERE = 0xFFFFFFFF
_RECORD = struct.Struct("<QIIQI")  # block, birth, death, location, data crc
_RECORD_SIZE = _RECORD.size + 4  # and the record's own crc
_PAGE = mmap.PAGESIZE
_BLOCKS_PER_PAGE = _PAGE // 8
_COLD_AT_MOST = 1 << 20  # places ``start_writeback`` may have waiting (8 MiB of arrays)
_LOG_ROOM = 1 << 20  # the log's room is allocated this much at a time
_NO_RECORD = bytes(_RECORD_SIZE)  # room not written yet (a record's crc is never 0 0 0 0)
_FIELDS = 5  # block and a version, in the array of versions not indexed yet


#: A version: (birth, death, location, crc). Plain tuples of ints, which the garbage
#: collector stops tracking: a replica may keep millions of them, and tracked objects (a
#: NamedTuple's instances are) made every full collection walk them all.
Version = tuple[int, int, int, int]
BIRTH, DEATH, LOCATION, CRC = range(4)


@dataclass(frozen=True)
class Kept:
    id: str
    number: int
    created: float


def _record(block: int, version: Version) -> bytes:
    body = _RECORD.pack(block, *version)
    return body + struct.pack("<I", crc32(body))


def make(path: Path, blocks: int) -> None:
    """Turn snapshots on for the replica in ``path`` (empty files, then SNAPSHOTS_FILE)."""
    for name, size in zip(FILES, (blocks * 8, 0, 0), strict=True):
        fd = os.open(path / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    write_json_atomic(path / SNAPSHOTS_FILE, {"seq": 0, "snapshots": []})
    fsync_dir(path)


def remove_leftovers(path: Path) -> None:
    """Remove what an interrupted ``make`` left (no SNAPSHOTS_FILE: snapshots are off)."""
    for name in FILES:
        (path / name).unlink(missing_ok=True)


class VersionMap:
    """The heads and versions of one replica's blocks (see the module's docstring).

    Methods take the replica's data file and checksums; the replica keeps its checksums
    (of the heads) itself. ``flush`` may run in a worker thread while the event loop
    thread writes: a write appends its records to the log before it changes ``heads``,
    and ``flush`` copies the pages of ``heads`` before it syncs the log.
    """

    def __init__(self, path: Path, blocks: int, volume_id: str, data_fd: int,
                 sums: memoryview) -> None:
        self._path = path
        self._data_fd = data_fd  # the replica's, which closes it
        self.volume_id = volume_id
        meta = json.loads((path / SNAPSHOTS_FILE).read_text())
        self.seq = int(meta["seq"])
        self._kept = {
            s["id"]: Kept(s["id"], int(s["number"]), float(s["created"]))
            for s in meta["snapshots"]
        }
        self._numbers = sorted(k.number for k in self._kept.values())
        self._blocks = blocks
        fds: list[int] = []
        try:
            for name in FILES:
                fds.append(os.open(path / name, os.O_RDWR | os.O_CLOEXEC))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._heads_fd, self._log_fd, self._extra_fd = fds
        self._map_heads()
        self._dirty: set[int] = set()  # pages of heads changed since the last flush
        self._versions: dict[int, tuple[Version, ...]] = {}
        self._by_death: dict[int, set[int]] = {}  # seq that superseded them → blocks
        # versions that writes made, indexed (into the two above) only when something
        # reads the index: a write appends five numbers instead of updating two tables
        self._unindexed = array("Q")
        self._unindexed_lock = threading.Lock()  # the swap in ``_index`` against writes
        self._index_lock = threading.RLock()  # see ``_indexed`` (scrubs run in a worker)
        self._log_map: mmap.mmap | None = None
        self._log_room = 0  # bytes of the log mapped (records, then zeros)
        self._log_size = 0
        self._log_live = 0  # records in the log a kept snapshot still holds
        self._free: list[int] = []
        self._next_slot = 1
        # what deletions left to punch, punched a little at a time (``reclaim``) by another
        # thread; slots are free again only once punched
        self._reclaim_lock = threading.Lock()
        self._to_punch: list[tuple[int, Version]] = []
        self._punched: list[int] = []
        # places whose data became a version since ``start_writeback`` last ran (see there):
        # blocks of ``data`` and slots of ``extra``; the event loop thread appends
        self._cold_homes = array("Q")
        self._cold_slots = array("Q")
        self._load(sums)

    def _map_heads(self) -> None:
        size = self._blocks * 8
        if os.fstat(self._heads_fd).st_size < size:  # a grow that stopped before meta.json
            os.ftruncate(self._heads_fd, size)
        self._heads_map = mmap.mmap(self._heads_fd, size, mmap.MAP_PRIVATE,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
        self._heads = memoryview(self._heads_map).cast("I")

    # --- loading -----------------------------------------------------------------------

    def _load(self, sums: memoryview) -> None:
        """Read the log: keep the records whose write reached ``heads`` and that a kept
        snapshot holds; punch the data of versions no snapshot holds any more.

        A record whose write never reached ``heads`` names the head's own data, and its
        checksum: ``sums`` (a shared map, written back at any time) may hold the checksum
        of the write that was lost, so the record's is put back.
        """
        raw = b""
        with open(self._log_fd, "rb", closefd=False) as f:
            raw = f.read()
        heads = self._heads
        kept: dict[tuple[int, int], Version] = {}
        dropped = torn = holes = room = end = 0
        orphans: list[tuple[int, Version]] = []
        for at in range(0, len(raw) - _RECORD_SIZE + 1, _RECORD_SIZE):
            if raw[at : at + _RECORD_SIZE] == _NO_RECORD:
                room += 1  # allocated ahead, or a page of records a crash lost
                continue
            holes, room, end = holes + room, 0, at + _RECORD_SIZE
            body = raw[at : at + _RECORD.size]
            (check,) = struct.unpack_from("<I", raw, at + _RECORD.size)
            if crc32(body) != check:
                torn += 1
                continue
            block, *fields = _RECORD.unpack(body)
            version: Version = (fields[0], fields[1], fields[2], fields[3])
            if block >= self._blocks:
                dropped += 1
                continue
            if heads[2 * block + 1] < version[DEATH]:
                dropped += 1  # its write never reached heads: the data is still the head's
                sums[block] = version[CRC]
                continue
            if not self._held(version):
                orphans.append((block, version))  # a deletion stopped before the punch
                continue
            kept[(block, version[BIRTH])] = version
        for (block, _), version in sorted(kept.items()):
            self._add(block, version)
        if dropped or torn or holes or len(raw) % _RECORD_SIZE:
            log.info("replica %s: versions log: %d records of writes lost in a crash, %d "
                     "torn, %d missing", self.volume_id, dropped, torn, holes)
            self._rewrite_log()
        else:
            self._log_size = end
            self._log_live = len(kept)
            self._map_log(len(raw))
        used = self._find_free_slots()
        # versions of deleted snapshots: punched already, or not yet (a crash); their
        # places may have been given to new data since: only what nothing uses is punched
        self._release([(b, v) for b, v in orphans if v[LOCATION] not in used
                       and not (v[LOCATION] == HOME and heads[2 * b] == HOME)], free=False)

    def _add(self, block: int, version: Version) -> None:
        versions = self._versions
        held = versions.get(block)
        versions[block] = (version,) if held is None else held + (version,)
        blocks = self._by_death.get(version[DEATH])
        if blocks is None:
            self._by_death[version[DEATH]] = {block}
        else:
            blocks.add(block)

    def _find_free_slots(self) -> set[int]:
        """Find the slots in use and the free ones; return the slots in use."""
        extra_size = os.fstat(self._extra_fd).st_size
        if not extra_size:
            return set()
        used = {loc for loc in self._heads[0::2].tolist() if loc not in (HOME, NOWHERE)}
        used.update(v[LOCATION] for vs in self._versions.values() for v in vs if v[LOCATION])
        self._next_slot = max(used, default=0) + 1
        self._free = sorted(set(range(1, self._next_slot)) - used, reverse=True)
        return used

    def _rewrite_log(self) -> None:
        """Replace the log with the versions kept now (atomically)."""
        with self._indexed():
            records = b"".join(_record(block, v)
                               for block, vs in sorted(self._versions.items()) for v in vs)
        tmp = self._path / ".versions.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, records)
            os.fsync(fd)
            os.rename(tmp, self._path / "versions")
            fsync_dir(self._path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._unmap_log()
        os.close(self._log_fd)
        self._log_fd = fd
        self._log_size = len(records)
        self._log_live = len(records) // _RECORD_SIZE
        self._map_log(len(records))

    def _map_log(self, size: int) -> None:
        """Map the log's ``size`` bytes (its records and any room after them)."""
        if size:
            self._log_map = mmap.mmap(self._log_fd, size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        self._log_room = size

    def _unmap_log(self) -> None:
        if self._log_map is not None:
            self._log_map.close()
            self._log_map = None
        self._log_room = 0

    def _make_room(self, end: int) -> None:
        """Allocate the log up to past ``end`` (so that writes through the map never meet
        a full disk: that would be SIGBUS) and map it."""
        room = (end // _LOG_ROOM + 1) * _LOG_ROOM
        os.posix_fallocate(self._log_fd, 0, room)  # ENOSPC here: nothing changed
        self._unmap_log()
        self._map_log(room)

    @contextmanager
    def _indexed(self) -> Iterator[None]:
        """Index the versions writes made since, and keep other threads from changing the
        index meanwhile (any thread; writes go on: they only add to ``_unindexed``)."""
        with self._index_lock:
            if self._unindexed:
                with self._unindexed_lock:
                    made, self._unindexed = self._unindexed, array("Q")
                for k in range(0, len(made), _FIELDS):
                    self._add(made[k], (made[k + 1], made[k + 2], made[k + 3], made[k + 4]))
            yield

    # --- snapshots ---------------------------------------------------------------------

    def kept(self) -> list[Kept]:
        return sorted(self._kept.values(), key=lambda k: k.number)

    def find(self, snapshot_id: str) -> Kept:
        found = self._kept.get(snapshot_id)
        if found is None:
            raise SnapshotNotFound(name=snapshot_id)
        return found

    def _held(self, version: Version) -> bool:
        """Whether a kept snapshot holds ``version`` (a number in (birth, death])."""
        at = bisect.bisect_right(self._numbers, version[BIRTH])
        return at < len(self._numbers) and self._numbers[at] <= version[DEATH]

    def take(self, snapshot_id: str, created: float) -> Kept:
        """Record a new snapshot of the heads as they are (the caller flushed them)."""
        taken = Kept(snapshot_id, self.seq + 1, created)
        self._save({**self._kept, snapshot_id: taken}, taken.number)
        self.seq = taken.number
        self._kept[snapshot_id] = taken
        self._numbers.append(taken.number)
        return taken

    def _save(self, kept: dict[str, Kept], seq: int) -> None:
        write_json_atomic(self._path / SNAPSHOTS_FILE, {
            "seq": seq,
            "snapshots": [{"id": k.id, "number": k.number, "created": k.created}
                          for k in sorted(kept.values(), key=lambda k: k.number)],
        })

    def delete(self, snapshot_id: str) -> int:
        """Forget a snapshot (the caller flushed the heads); return the bytes freed."""
        gone = self.find(snapshot_id)
        with self._indexed():
            garbage = self._forget(gone)
        with self._reclaim_lock:
            self._to_punch.extend(garbage)
        return len(garbage) * BLOCK_SIZE

    def _forget(self, gone: Kept) -> list[tuple[int, Version]]:
        """``delete``'s work on the index: the versions only ``gone`` held."""
        kept = {k: v for k, v in self._kept.items() if k != gone.id}
        self._save(kept, self.seq)
        self._kept = kept
        self._numbers.remove(gone.number)
        at = bisect.bisect_left(self._numbers, gone.number)
        before = self._numbers[at - 1] if at else 0
        after = self._numbers[at] if at < len(self._numbers) else self.seq + 1
        garbage: list[tuple[int, Version]] = []
        for death in range(gone.number, after):  # superseded before the next kept one
            blocks = self._by_death.get(death)
            if not blocks:
                continue
            for block in list(blocks):
                versions = self._versions[block]
                alone = [v for v in versions if v[DEATH] == death and v[BIRTH] >= before]
                if not alone:
                    continue
                garbage.extend((block, v) for v in alone)
                rest = tuple(v for v in versions if v not in alone)
                if rest:
                    self._versions[block] = rest
                else:
                    del self._versions[block]
                if not any(v[DEATH] == death for v in rest):
                    blocks.discard(block)
            if not blocks:
                del self._by_death[death]
        self._log_live -= len(garbage)
        if self._log_size > 4 * max(self._log_live * _RECORD_SIZE, 1 << 20):
            self._rewrite_log()  # mostly records of deleted snapshots: make it small again
        return garbage

    def reclaim_pending(self) -> bool:
        return bool(self._to_punch)

    def reclaim(self, runs_at_most: int) -> int:
        """Punch up to ``runs_at_most`` runs of what deleted snapshots held (any thread);
        return the bytes punched. Bounded so that a big deletion frees its space over a
        while instead of in one storm of file system work."""
        with self._reclaim_lock:
            batch = sorted(self._to_punch, key=lambda g: (g[1][LOCATION] != HOME,
                                                          g[1][LOCATION] or g[0]))
            taken: list[tuple[int, Version]] = []
            count = 0
            previous = None
            for item in batch:
                key = (item[1][LOCATION] != HOME, item[1][LOCATION] or item[0])
                if previous is None or key[0] != previous[0] or key[1] != previous[1] + 1:
                    count += 1
                    if count > runs_at_most:
                        break
                taken.append(item)
                previous = key
            self._to_punch = batch[len(taken):]
        self._release(taken, free=False)
        slots = [v[LOCATION] for _, v in taken if v[LOCATION] not in (HOME, NOWHERE)]
        self._punched.extend(slots)  # the event loop thread takes them in ``_allocate``
        return len(taken) * BLOCK_SIZE

    def _release(self, garbage: list[tuple[int, Version]], free: bool = True) -> None:
        """Punch the blocks of versions no snapshot holds and free their slots."""
        homes = sorted(block for block, v in garbage if v[LOCATION] == HOME)
        slots = sorted(v[LOCATION] for _, v in garbage if v[LOCATION] not in (HOME, NOWHERE))
        try:
            for first, count in runs(homes):
                punch_hole(self._data_fd, first * BLOCK_SIZE, count * BLOCK_SIZE)
            for first, count in runs(slots):
                punch_hole(self._extra_fd, (first - 1) * BLOCK_SIZE, count * BLOCK_SIZE)
        except OSError as exc:  # the space stays taken; the data is no one's
            log.warning("replica %s: cannot punch the blocks of deleted snapshots: %s",
                        self.volume_id, exc)
        if free:
            self._free.extend(slots)
            self._free.sort(reverse=True)

    def unique_bytes(self) -> dict[str, int]:
        """Per kept snapshot, the bytes of data only it holds (freed when it is deleted)."""
        by_number = dict.fromkeys(self._numbers, 0)
        numbers = self._numbers
        with self._indexed():
            for versions in self._versions.values():
                for v in versions:
                    lo = bisect.bisect_right(numbers, v[BIRTH])
                    hi = bisect.bisect_right(numbers, v[DEATH])
                    if hi - lo == 1:
                        by_number[numbers[lo]] += BLOCK_SIZE
        return {k.id: by_number[k.number] for k in self._kept.values()}

    # --- I/O ---------------------------------------------------------------------------

    def _allocate(self) -> int:
        if not self._free and self._punched:
            with self._reclaim_lock:
                punched, self._punched = self._punched, []
            self._free = sorted(punched, reverse=True)
        if self._free:
            return self._free.pop()
        slot = self._next_slot
        if slot >= NOWHERE:
            raise OSError(28, "no slot left in the replica's extra file")
        self._next_slot += 1
        return slot

    def _mark(self, first: int, count: int) -> None:
        self._dirty.update(range(first // _BLOCKS_PER_PAGE,
                                 (first + count - 1) // _BLOCKS_PER_PAGE + 1))

    def write(self, first: int, data: memoryview, sums: memoryview) -> None:
        """Write whole blocks from block ``first``: a block a snapshot holds gets a new
        slot (its old place becomes a version); the others are written where they lie."""
        if len(data) == BLOCK_SIZE:
            self._write_one(first, data, sums)
            return
        heads = self._heads
        latest = self._numbers[-1] if self._numbers else 0
        seq = self.seq
        count = len(data) // BLOCK_SIZE
        places: list[int] = []
        moved: list[tuple[int, Version]] = []
        fresh: list[int] = []
        for i in range(first, first + count):
            place, birth = heads[2 * i], heads[2 * i + 1]
            if birth < latest and sums[i]:
                moved.append((i, (birth, seq, place, sums[i])))
                place = self._allocate()
                fresh.append(place)
            elif place == NOWHERE:
                place = self._allocate()
                fresh.append(place)
            places.append(place)
        try:
            self._write_places(first, places, data)
            if moved:
                self._append(b"".join(_record(i, v) for i, v in moved))
        except BaseException:
            self._free.extend(fresh)
            self._free.sort(reverse=True)
            raise
        self._made(moved)
        for k, place in enumerate(places):
            heads[2 * (first + k)] = place
            heads[2 * (first + k) + 1] = seq
        self._mark(first, count)

    def _write_one(self, i: int, data: memoryview, sums: memoryview) -> None:
        """``write`` of one block (the common 4 KiB random write), without lists."""
        heads = self._heads
        place, birth = heads[2 * i], heads[2 * i + 1]
        numbers = self._numbers
        old = NOWHERE  # where the version this write makes lies (NOWHERE: none made)
        if numbers and birth < numbers[-1] and sums[i]:
            old, place = place, NOWHERE
        if place == NOWHERE:
            place = self._allocate()
            try:
                os.pwrite(self._extra_fd, data, (place - 1) * BLOCK_SIZE)
                if old != NOWHERE:
                    crc = sums[i]
                    self._append(_record(i, (birth, self.seq, old, crc)))
                    with self._unindexed_lock:
                        self._unindexed.extend((i, birth, self.seq, old, crc))
            except BaseException:
                self._free.append(place)
                self._free.sort(reverse=True)
                raise
            if old != NOWHERE:
                self._went_cold(i, old)
        elif place == HOME:
            os.pwrite(self._data_fd, data, i * BLOCK_SIZE)
        else:
            os.pwrite(self._extra_fd, data, (place - 1) * BLOCK_SIZE)
        heads[2 * i] = place
        heads[2 * i + 1] = self.seq
        self._dirty.add(i // _BLOCKS_PER_PAGE)

    def trim(self, first: int, count: int, sums: memoryview) -> None:
        """Deallocate blocks: a block a snapshot holds becomes a version, the others are
        punched where they lie. The caller zeroes their checksums."""
        heads = self._heads
        latest = self._numbers[-1] if self._numbers else 0
        seq = self.seq
        moved: list[tuple[int, Version]] = []
        homes: list[int] = []
        slots: list[int] = []
        for i in range(first, first + count):
            place, birth = heads[2 * i], heads[2 * i + 1]
            if birth < latest and sums[i]:
                moved.append((i, (birth, seq, place, sums[i])))
            elif place == HOME:
                homes.append(i)
            elif place != NOWHERE:
                slots.append(place)
        if moved:
            self._append(b"".join(_record(i, v) for i, v in moved))
            self._made(moved)
            for i, _ in moved:
                heads[2 * i] = NOWHERE
        for i in range(first, first + count):
            heads[2 * i + 1] = seq
        self._mark(first, count)
        for start, run in runs(homes):
            punch_hole(self._data_fd, start * BLOCK_SIZE, run * BLOCK_SIZE)
        for start, run in runs(sorted(slots)):
            punch_hole(self._extra_fd, (start - 1) * BLOCK_SIZE, run * BLOCK_SIZE)

    def _made(self, moved: list[tuple[int, Version]]) -> None:
        """Note the versions a write made (appended to the log already)."""
        with self._unindexed_lock:
            for i, version in moved:
                self._unindexed.extend((i, *version))
        for i, version in moved:
            self._went_cold(i, version[LOCATION])

    def _went_cold(self, block: int, location: int) -> None:
        if len(self._cold_slots) + len(self._cold_homes) >= _COLD_AT_MOST:
            return  # nobody drops them (no writeback turn): the kernel's LRU will
        if location == HOME:
            self._cold_homes.append(block)
        elif location != NOWHERE:
            self._cold_slots.append(location)

    def start_writeback(self) -> None:
        """Start writing the slots' dirty pages; drop from the page cache the pages of data
        that only snapshots hold now.

        The first write to a block after a snapshot leaves the block's old data in place
        and takes a new page: without this, the cache grows by a page per such write with
        pages that only snapshot reads (backups, clones) will want, and the kernel only
        evicts them under memory pressure. Dropped at once, the freed pages are what the
        next such writes get, where a page fresh from the host costs a fault in a VM that
        reports free pages (``first_touch_us`` in benchmarks/fio_bench.py): with 64
        snapshots a data server spent ~23% of its CPU copying writes into such pages. The
        snapshot's flush made them durable, so they are clean and go at once; a page
        cached in a large folio (a large write's) goes only once all of it is cold. Run
        by the writeback thread (``DiskReplica.start_writeback``).
        """
        start_writing(self._extra_fd)
        homes, self._cold_homes = self._cold_homes, array("Q")
        slots, self._cold_slots = self._cold_slots, array("Q")
        for fd, places, base in ((self._data_fd, homes, 0), (self._extra_fd, slots, 1)):
            for start, run in runs(sorted(places)):
                os.posix_fadvise(fd, (start - base) * BLOCK_SIZE, run * BLOCK_SIZE,
                                 os.POSIX_FADV_DONTNEED)

    def _append(self, records: bytes) -> None:
        at = self._log_size
        end = at + len(records)
        if end > self._log_room:
            self._make_room(end)
        assert self._log_map is not None
        self._log_map[at:end] = records
        self._log_size = end
        self._log_live += len(records) // _RECORD_SIZE

    def _write_places(self, first: int, places: list[int], data: memoryview) -> None:
        for k, run, fd, at in self._runs_of(first, places):
            piece = data[k * BLOCK_SIZE : (k + run) * BLOCK_SIZE]
            done = 0
            while done < len(piece):
                done += os.pwrite(fd, piece[done:], at + done)

    def _runs_of(self, first: int, places: list[int]) -> Iterator[tuple[int, int, int, int]]:
        """(index in places, blocks, fd, byte offset) of each run of blocks that lie one
        after the other in one file; NOWHERE runs have fd -1."""
        k = 0
        while k < len(places):
            place = places[k]
            run = 1
            if place == HOME:
                while k + run < len(places) and places[k + run] == HOME:
                    run += 1
                yield k, run, self._data_fd, (first + k) * BLOCK_SIZE
            elif place == NOWHERE:
                while k + run < len(places) and places[k + run] == NOWHERE:
                    run += 1
                yield k, run, -1, 0
            else:
                while k + run < len(places) and places[k + run] == place + run:
                    run += 1
                yield k, run, self._extra_fd, (place - 1) * BLOCK_SIZE
            k += run

    def _read_places(self, first: int, places: list[int], nowait: bool = False) -> bytes:
        """With ``nowait``, BlockingIOError unless every byte is in the page cache."""
        out = bytearray(len(places) * BLOCK_SIZE)
        flags = os.RWF_NOWAIT if nowait else 0
        for k, run, fd, at in self._runs_of(first, places):
            if fd < 0:
                continue
            into = [memoryview(out)[k * BLOCK_SIZE : (k + run) * BLOCK_SIZE]]
            try:
                got = os.preadv(fd, into, at, flags)
            except OSError as exc:  # BlockingIOError (EAGAIN) goes on up
                if exc.errno != errno.EOPNOTSUPP or not flags:
                    raise
                flags, got = 0, os.preadv(fd, into, at)  # a file system that cannot tell
            if flags and got < run * BLOCK_SIZE:
                raise BlockingIOError(errno.EAGAIN, "not all in the page cache")
            # otherwise a short read leaves zeros: the checksums decide
        return bytes(out)

    def moved(self, first: int, count: int) -> bool:
        """Whether any of the blocks lies elsewhere than at home."""
        if count == 1:
            return self._heads[2 * first] != HOME
        return any(self._heads[2 * first : 2 * (first + count) : 2].tolist())

    def head_place(self, block: int) -> tuple[int, int]:
        """(fd, byte offset) of a block's head; fd -1 when it lies nowhere (zeros)."""
        place = self._heads[2 * block]
        if place == NOWHERE:
            return -1, 0
        return self._place(block, place)

    def read_heads(self, first: int, count: int, nowait: bool = False) -> bytes:
        """The raw bytes of the heads of ``count`` blocks (not verified); with ``nowait``,
        BlockingIOError unless they are all in the page cache."""
        return self._read_places(first, self._heads[2 * first : 2 * (first + count) : 2].tolist(),
                                 nowait)

    def read_snapshot(self, number: int, first: int, count: int,
                      sums: memoryview) -> tuple[bytes, list[int]]:
        """Snapshot ``number``'s raw bytes of ``count`` blocks and their checksums
        (0: the block held no data then)."""
        heads = self._heads
        places: list[int] = []
        crcs: list[int] = []
        with self._indexed():
            for i in range(first, first + count):
                if heads[2 * i + 1] < number:  # unchanged since the snapshot
                    place, crc = heads[2 * i], sums[i]
                else:
                    place, crc = NOWHERE, 0
                    for v in self._versions.get(i, ()):
                        if v[BIRTH] < number <= v[DEATH]:
                            place, crc = v[LOCATION], v[CRC]
                            break
                places.append(place if crc else NOWHERE)
                crcs.append(crc)
        return self._read_places(first, places), crcs

    def _place(self, block: int, location: int) -> tuple[int, int]:
        if location == HOME:
            return self._data_fd, block * BLOCK_SIZE
        return self._extra_fd, (location - 1) * BLOCK_SIZE

    def damaged(self) -> list[tuple[int, int]]:
        """(a snapshot number holding it, block) of every version whose data fails its
        checksum. Runs in a worker thread: it reads a copy of the index, and a version
        dropped meanwhile (its place may be punched already) is not reported."""
        with self._indexed():
            index = list(self._versions.items())
        found = []
        for block, versions in index:
            for v in versions:
                fd, at = self._place(block, v[LOCATION])
                if (crc32(os.pread(fd, BLOCK_SIZE, at)) or 1) == v[CRC]:
                    continue
                if v in self._versions.get(block, ()):
                    number = self._numbers[bisect.bisect_right(self._numbers, v[BIRTH])]
                    found.append((number, block))
        return found

    def repair(self, number: int, block: int, data: bytes) -> bool:
        """Write ``data`` back where snapshot ``number``'s version of ``block`` lies; False
        when the snapshot reads the head there (the head's to repair)."""
        with self._indexed():
            versions = self._versions.get(block, ())
        for v in versions:
            if v[BIRTH] < number <= v[DEATH]:
                if (crc32(data) or 1) != v[CRC]:
                    raise OSError(22, "the data does not match the block's checksum")
                fd, at = self._place(block, v[LOCATION])
                os.pwrite(fd, data, at)
                return True
        return False

    def written_between(self, since: int, until: int) -> set[int]:
        """Blocks written at a seq in [since, until) (until 0: up to now): where snapshot
        ``since`` and snapshot ``until`` (or the heads) may differ. A write's seq is the
        birth of what it wrote and the death of what it replaced, so both are looked at
        (the version in between may have been dropped)."""
        end = until or NOWHERE + 1
        births = self._heads[1::2].tolist()
        found = {i for i, birth in enumerate(births) if since <= birth < end}
        with self._indexed():
            for block, versions in self._versions.items():
                if any(since <= v[BIRTH] < end or since <= v[DEATH] < end for v in versions):
                    found.add(block)
        return found

    def held_by(self, number: int, sums: memoryview) -> set[int]:
        """Blocks holding data in snapshot ``number``."""
        births = self._heads[1::2].tolist()
        found = {i for i, birth in enumerate(births) if birth < number and sums[i]}
        with self._indexed():
            for block, versions in self._versions.items():
                if any(v[BIRTH] < number <= v[DEATH] for v in versions):
                    found.add(block)
        return found

    # --- durability and size -----------------------------------------------------------

    def flush(self) -> None:
        """Make the slots and records durable, then the pages of heads changed since the
        last flush (copied first: see the class docstring)."""
        dirty, self._dirty = self._dirty, set()
        pages = [(p, self._heads_map[p * _PAGE : (p + 1) * _PAGE]) for p in sorted(dirty)]
        try:
            os.fdatasync(self._extra_fd)
            os.fdatasync(self._log_fd)
            for page, content in pages:
                os.pwrite(self._heads_fd, content, page * _PAGE)
            os.fdatasync(self._heads_fd)
        except BaseException:
            self._dirty.update(dirty)
            raise

    def grow(self, blocks: int) -> None:
        """Lengthen heads to ``blocks`` (call under the replica's flush lock)."""
        os.ftruncate(self._heads_fd, blocks * 8)
        os.fsync(self._heads_fd)
        old_map, old_view = self._heads_map, self._heads
        pending = [(p, old_map[p * _PAGE : (p + 1) * _PAGE]) for p in sorted(self._dirty)]
        self._blocks = blocks
        self._map_heads()
        for page, content in pending:  # changes not flushed yet move to the new map
            self._heads_map[page * _PAGE : page * _PAGE + len(content)] = content
        old_view.release()
        old_map.close()

    def used(self) -> int:
        return os.fstat(self._extra_fd).st_blocks * 512

    def close(self) -> None:
        self._heads.release()
        self._heads_map.close()
        self._unmap_log()
        for fd in (self._heads_fd, self._log_fd, self._extra_fd):
            os.close(fd)

