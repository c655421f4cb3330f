"""Snapshots in the chunk stores: one contract for memory and disk, the disk format's
redirect-on-write, its recovery after a crash, and a random model check of the disk store
against the memory reference."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cargohold.core.layout import BLOCK_SIZE
from cargohold.errors import InvalidArgument, SnapshotNotFound, TooManySnapshots
from cargohold.stores import chunkstore
from cargohold.stores.chunkstore import ChunkStore, MemoryChunkStore
from cargohold.stores.diskstore import DiskChunkStore
from tests.pagecache import cached

MIB = 1 << 20
B = BLOCK_SIZE


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    made: ChunkStore = MemoryChunkStore() if request.param == "memory" else DiskChunkStore(tmp_path)
    yield made
    made.close()


def sid() -> str:
    return uuid.uuid4().hex


def fill(byte: int, blocks: int = 1) -> bytes:
    return bytes([byte]) * (blocks * B)


def test_a_snapshot_keeps_what_was_written_before_it(store: ChunkStore) -> None:
    replica = store.create(sid(), 4 * MIB)
    replica.write(0, fill(1, 4), 1)
    s1 = sid()
    info = replica.take_snapshot(s1, 1000.0)
    assert (info.id, info.number, info.created, info.unique) == (s1, 1, 1000.0, 0)
    replica.write(B, fill(2, 2), 2)  # overwrite two of the four blocks
    replica.trim(3 * B, B, 3)
    replica.write(MIB, fill(9), 4)  # a block never written before the snapshot
    assert replica.read(0, 4 * B) == fill(1) + fill(2, 2) + bytes(B)
    assert replica.read_snapshot(s1, 0, 4 * B) == fill(1, 4)
    assert replica.read_snapshot(s1, MIB, B) == bytes(B)
    # what only the snapshot holds now: the three blocks written or trimmed since
    assert [s.unique for s in replica.snapshots()] == [3 * B]


def test_snapshots_are_independent_of_each_other(store: ChunkStore) -> None:
    replica = store.create(sid(), MIB)
    ids = []
    for n in range(5):
        replica.write(0, fill(n + 1), n + 1)
        ids.append(sid())
        replica.take_snapshot(ids[-1], float(n))
    replica.write(0, fill(99), 9)
    for n, snapshot in enumerate(ids):
        assert replica.read_snapshot(snapshot, 0, B) == fill(n + 1)
    assert replica.delete_snapshot(ids[2]) == B  # held block 0 version 3 alone
    assert replica.snapshot_ids() == ids[:2] + ids[3:]
    for n in (0, 1, 3, 4):
        assert replica.read_snapshot(ids[n], 0, B) == fill(n + 1)
    assert replica.read(0, B) == fill(99)


def test_a_block_shared_by_snapshots_is_freed_with_the_last(store: ChunkStore) -> None:
    replica = store.create(sid(), MIB)
    replica.write(0, fill(1), 1)
    a, b = sid(), sid()
    replica.take_snapshot(a, 0.0)
    replica.take_snapshot(b, 0.0)
    replica.write(0, fill(2), 2)
    assert [s.unique for s in replica.snapshots()] == [0, 0]  # both hold the same version
    assert replica.delete_snapshot(a) == 0
    assert [s.unique for s in replica.snapshots()] == [B]
    assert replica.read_snapshot(b, 0, B) == fill(1)
    assert replica.delete_snapshot(b) == B
    assert replica.snapshots() == []
    assert replica.read(0, B) == fill(2)


def test_taking_is_idempotent_and_unknown_ids_are_refused(store: ChunkStore) -> None:
    replica = store.create(sid(), MIB)
    s = sid()
    first = replica.take_snapshot(s, 5.0)
    replica.write(0, fill(3), 1)
    assert replica.take_snapshot(s, 6.0) == first  # the same one, not a new cut
    assert replica.read_snapshot(s, 0, B) == bytes(B)
    with pytest.raises(SnapshotNotFound):
        replica.read_snapshot(sid(), 0, B)
    with pytest.raises(InvalidArgument):
        replica.take_snapshot("../x", 0.0)
    with pytest.raises(InvalidArgument):
        replica.read_snapshot(s, 1, B)
    assert replica.delete_snapshot(sid()) == 0
    assert replica.snapshot_ids() == [s]


def test_the_snapshot_limit_is_a_clear_error(store: ChunkStore,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunkstore, "MAX_SNAPSHOTS", 3)
    replica = store.create(sid(), MIB)
    for _ in range(3):
        replica.take_snapshot(sid(), 0.0)
    with pytest.raises(TooManySnapshots, match="keeps 3 snapshots"):
        replica.take_snapshot(sid(), 0.0)
    assert len(replica.snapshot_ids()) == 3


def test_growing_keeps_snapshots(store: ChunkStore) -> None:
    replica = store.create(sid(), MIB)
    replica.write(MIB - B, fill(7), 1)
    s = sid()
    replica.take_snapshot(s, 0.0)
    replica.write(MIB - B, fill(8), 2)  # not flushed before the grow
    replica.grow(2 * MIB)
    replica.write(2 * MIB - B, fill(9), 3)
    assert replica.read(MIB - B, B) == fill(8)
    assert replica.read_snapshot(s, MIB - B, B) == fill(7)
    assert replica.read_snapshot(s, 2 * MIB - B, B) == bytes(B)


# --- the disk format ---------------------------------------------------------------------


def test_writes_after_a_snapshot_cost_only_the_blocks_written(tmp_path: Path) -> None:
    disk = DiskChunkStore(tmp_path)
    try:
        replica = disk.create(sid(), 64 * MIB)
        replica.write(0, fill(1, 2048), 1)  # 8 MiB
        replica.flush()
        before = replica.info().used
        replica.take_snapshot(sid(), 0.0)
        assert replica.info().used == before  # taking one writes no data
        for k in range(0, 2048, 64):  # a 4 KiB write in every 256 KiB
            replica.write(k * B, fill(2), 2)
        replica.flush()
        grown = replica.info().used - before
        assert grown == 32 * B  # one new block each, nothing copied beside it
        assert disk.used() == replica.info().used
    finally:
        disk.close()


def test_data_that_only_snapshots_hold_leaves_the_page_cache(tmp_path: Path) -> None:
    disk = DiskChunkStore(tmp_path)
    try:
        volume = sid()
        replica = disk.create(volume, 4 * MIB)
        for k in range(8):  # 4 KiB writes: pages of their own (a large write may be cached
            replica.write(k * B, fill(1), 1)  # in large folios, dropped only whole)
        snap = sid()
        replica.take_snapshot(snap, 0.0)  # flushed: the 8 pages are clean, and cached
        home = tmp_path / "replicas" / volume / "data"
        assert cached(home, 8) == [True] * 8
        replica.write(2 * B, fill(2), 2)  # moved to extra: their old pages go cold
        replica.write(5 * B, fill(3), 3)
        replica.write(5 * B, fill(4), 4)  # in place in extra: nothing more goes cold
        replica.start_writeback()
        assert cached(home, 8) == [True, True, False, True, True, False, True, True]
        assert replica.read(0, 8 * B) == fill(1, 2) + fill(2) + fill(1, 2) + fill(4) \
            + fill(1, 2)
        assert replica.read_snapshot(snap, 0, 8 * B) == fill(1, 8)
    finally:
        disk.close()


def test_deleting_the_snapshot_punches_what_it_held(tmp_path: Path) -> None:
    disk = DiskChunkStore(tmp_path)
    try:
        replica = disk.create(sid(), 16 * MIB)
        replica.write(0, fill(1, 1024), 1)  # 4 MiB
        s = sid()
        replica.take_snapshot(s, 0.0)
        replica.write(0, fill(2, 1024), 2)  # all of it again: 4 MiB more
        replica.flush()
        assert replica.info().used >= 8 * MIB
        assert replica.delete_snapshot(s) == 4 * MIB
        assert replica.info().used >= 8 * MIB  # punched later, a little at a time
        assert replica.reclaim(1) == 4 * MIB  # one run: the whole 4 MiB lay in one
        assert replica.reclaim(1) == 0
        assert replica.info().used <= 4 * MIB + 64 * 1024
        replica.write(0, fill(3, 1024), 3)  # reuses the freed space; no snapshot: in place
        assert replica.read(0, 4 * MIB) == fill(3, 1024)
        assert replica.info().used <= 4 * MIB + 64 * 1024
    finally:
        disk.close()


def test_snapshots_survive_a_reopen(tmp_path: Path) -> None:
    disk = DiskChunkStore(tmp_path)
    v, s = sid(), sid()
    replica = disk.create(v, 4 * MIB)
    replica.write(0, fill(1, 8), 1)
    replica.take_snapshot(s, 12.5)
    replica.write(0, fill(2, 4), 2)
    replica.trim(4 * B, 2 * B, 3)
    replica.flush()
    disk.close()
    disk = DiskChunkStore(tmp_path)
    try:
        replica = disk.replica(v)
        assert [(x.id, x.created, x.unique) for x in replica.snapshots()] == [(s, 12.5, 6 * B)]
        assert replica.read_snapshot(s, 0, 8 * B) == fill(1, 8)
        assert replica.read(0, 8 * B) == fill(2, 4) + bytes(2 * B) + fill(1, 2)
        replica.write(0, fill(4), 4)  # the head, written since the snapshot: in place
        assert replica.read_snapshot(s, 0, B) == fill(1)
    finally:
        disk.close()


def test_a_crash_before_the_flush_keeps_the_snapshot(tmp_path: Path) -> None:
    """The log and the slots reached the disk but the heads did not (the data server died
    between a write and the next flush): the snapshot still reads its own bytes, and the
    head is the old data again (the log's records give back the checksums the shared map of
    checksums had already replaced)."""
    disk = DiskChunkStore(tmp_path)
    v, s = sid(), sid()
    replica = disk.create(v, 4 * MIB)
    replica.write(0, fill(1, 4), 1)
    replica.take_snapshot(s, 0.0)
    replica.write(0, fill(2, 4), 2)  # not flushed: heads stay in the private map
    disk.close()  # closing without a flush is what a crash leaves (page cache kept)
    disk = DiskChunkStore(tmp_path)
    try:
        replica = disk.replica(v)
        assert replica.read_snapshot(s, 0, 4 * B) == fill(1, 4)
        assert replica.read(0, 4 * B) == fill(1, 4)
        replica.write(0, fill(3, 4), 3)  # and writing on moves the data again, safely
        replica.flush()
        assert replica.read(0, 4 * B) == fill(3, 4)
        assert replica.read_snapshot(s, 0, 4 * B) == fill(1, 4)
        assert sorted(os.listdir(tmp_path / "replicas" / v)) == [
            "data", "epoch", "extra", "gens", "heads", "meta.json", "snapshots.json",
            "sums", "versions"]
    finally:
        disk.close()


def test_the_log_is_written_ahead_into_room_and_read_back_to_its_end(tmp_path: Path) -> None:
    """Records go through a map into room allocated ahead (zeros): the log file is longer
    than its records, a reopen appends after the last record, and a page of records a
    machine crash lost (zeros between records) is noticed and the log rewritten."""
    disk = DiskChunkStore(tmp_path)
    v, s = sid(), sid()
    replica = disk.create(v, 4 * MIB)
    replica.write(0, fill(1, 256), 1)
    replica.take_snapshot(s, 0.0)
    for k in range(200):  # one record each, into the room
        replica.write(k * B, fill(2), 2)
    replica.flush()
    log = tmp_path / "replicas" / v / "versions"
    raw = log.read_bytes()
    assert len(raw) >= 1 << 20 and raw[200 * 32 :] == bytes(len(raw) - 200 * 32)
    disk.close()

    disk = DiskChunkStore(tmp_path)
    replica = disk.replica(v)
    s2 = sid()
    replica.take_snapshot(s2, 1.0)
    replica.write(0, fill(3, 256), 3)  # 256 records after the 200 (a block each)
    replica.flush()
    raw = log.read_bytes()
    assert raw[456 * 32 :] == bytes(len(raw) - 456 * 32) and raw[455 * 32 : 456 * 32] != bytes(32)
    disk.close()

    with open(log, "r+b") as f:  # records 1..127 lost: the first page minus its first record
        f.seek(32)
        f.write(bytes(127 * 32))
    disk = DiskChunkStore(tmp_path)
    try:
        replica = disk.replica(v)
        assert len(log.read_bytes()) == (456 - 127) * 32  # rewritten: the records kept
        assert replica.read(0, 256 * B) == fill(3, 256)
        assert replica.read_snapshot(s2, 200 * B, 56 * B) == fill(1, 56)
        replica.write(0, fill(4), 4)  # and on it goes
        replica.flush()
        assert replica.read_snapshot(s2, 200 * B, 56 * B) == fill(1, 56)
    finally:
        disk.close()


def test_a_scrub_in_another_thread_while_writes_go_on(tmp_path: Path) -> None:
    """Writes leave their versions for the index to take in later; a scrub indexes them
    from a worker thread while the writer goes on, and nothing is lost on either side."""
    import threading

    disk = DiskChunkStore(tmp_path)
    try:
        replica = disk.create(sid(), 8 * MIB)
        replica.write(0, fill(1, 2048), 1)
        kept = []
        damaged: list[object] = []
        for round_ in range(4):
            kept.append(sid())
            replica.take_snapshot(kept[-1], float(round_))
            scrubbing = threading.Thread(target=lambda: damaged.extend(replica.scrub_snapshots()))
            scrubbing.start()
            for k in range(2048):
                replica.write(k * B, fill(2 + round_), 2 + round_)
            scrubbing.join()
        assert damaged == []
        for round_, snapshot in enumerate(kept):
            assert replica.read_snapshot(snapshot, 0, 2048 * B) == fill(1 + round_, 2048)
        assert [s.unique for s in replica.snapshots()] == [2048 * B] * 4
    finally:
        disk.close()


def test_a_flush_with_nothing_new_to_sync_syncs_nothing(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot's cut follows the flush of its freeze with writes held: its own flush
    then costs no device flush. Anything written since, or a write that failed, syncs."""
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    disk = DiskChunkStore(tmp_path)
    try:
        replica = disk.create(sid(), MIB)
        replica.flush()
        assert synced, "the first flush of a replica opened syncs (a crash may have left data)"
        for change in (lambda: replica.write(0, fill(1), 1), lambda: replica.trim(0, B, 2),
                       lambda: replica.write(B, fill(1), 3)):
            change()
            synced.clear()
            replica.flush()
            assert synced, "a flush after a change must sync"
            synced.clear()
            replica.flush()
            assert synced == [], "nothing changed since the last flush"
        replica.take_snapshot(sid(), 0.0)  # snapshots on: their files sync too
        replica.write(2 * B, fill(1), 4)
        synced.clear()
        replica.take_snapshot(sid(), 1.0)  # flushes what the write left
        assert len(synced) >= 4, synced  # data, extra, the log, heads
        synced.clear()
        replica.flush()
        assert synced == []
        monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(5, "EIO")))
        with pytest.raises(OSError, match="EIO"):
            replica.write(0, fill(2), 5)
        monkeypatch.undo()
        monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
        for _ in range(2):  # a write that failed never ends: every flush syncs from then on
            synced.clear()
            replica.flush()
            assert synced
    finally:
        disk.close()


def test_a_half_made_first_snapshot_is_cleaned_up(tmp_path: Path) -> None:
    disk = DiskChunkStore(tmp_path)
    v = sid()
    disk.create(v, MIB).write(0, fill(5), 1)
    disk.close()
    for name in ("heads", "versions", "extra"):  # made, but snapshots.json never was
        (tmp_path / "replicas" / v / name).write_bytes(b"")
    disk = DiskChunkStore(tmp_path)
    try:
        replica = disk.replica(v)
        assert replica.snapshots() == []
        assert not (tmp_path / "replicas" / v / "heads").exists()
        assert replica.read(0, B) == fill(5)
    finally:
        disk.close()


# --- the disk store against the reference, at random ---------------------------------------

SIZE = 64 * B
_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 63), st.integers(1, 8), st.integers(1, 250)),
    st.tuples(st.just("trim"), st.integers(0, 63), st.integers(1, 8), st.just(0)),
    st.tuples(st.just("snap"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, 20), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("reclaim"), st.integers(1, 3), st.just(0), st.just(0)),
)


@settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=40))
def test_the_disk_store_matches_the_reference(tmp_path_factory: pytest.TempPathFactory,
                                              ops: list[tuple[str, int, int, int]]) -> None:
    root = tmp_path_factory.mktemp("model")
    memory = MemoryChunkStore()
    disk = DiskChunkStore(root)
    v = sid()
    want, got = memory.create(v, SIZE), disk.create(v, SIZE)
    taken: list[str] = []
    try:
        for gen, (op, at, count, byte) in enumerate(ops, start=1):
            count = min(count, 64 - at)
            if op == "write":
                data = bytes([byte]) * (count * B)
                want.write(at * B, data, gen)
                got.write(at * B, data, gen)
            elif op == "trim":
                want.trim(at * B, count * B, gen)
                got.trim(at * B, count * B, gen)
            elif op == "snap":
                taken.append(sid())
                want.take_snapshot(taken[-1], float(gen))
                got.take_snapshot(taken[-1], float(gen))
            elif op == "delete" and taken:
                gone = taken.pop(at % len(taken))
                assert got.delete_snapshot(gone) == want.delete_snapshot(gone)
            elif op == "reclaim":  # space of deleted snapshots, punched a little at a time
                got.reclaim(at)
            elif op == "reopen":
                got.flush()
                disk.close()
                disk = DiskChunkStore(root)
                got = disk.replica(v)
            assert got.read(0, SIZE) == want.read(0, SIZE)
        assert got.snapshots() == want.snapshots()
        for k in range(64):  # one block at a time: the single-block paths
            assert got.read(k * B, B) == want.read(k * B, B), k
        for snapshot in taken:
            assert got.read_snapshot(snapshot, 0, SIZE) == want.read_snapshot(snapshot, 0, SIZE)
        for snapshot in list(taken):
            got.delete_snapshot(snapshot)
        while got.reclaim(3):
            pass
        got.flush()
        # all deleted: what is left on disk is the head's blocks only (and at most a block
        # of ext4's extent tree in each of data and extra, counted in st_blocks too)
        heads = sum(1 for k in range(64) if want.read(k * B, B) != bytes(B))
        assert got.info().used <= (heads + 2) * B
    finally:
        disk.close()


def test_revert_writes_back_only_what_changed(store: ChunkStore) -> None:
    replica = store.create(sid(), 4 * MIB)
    replica.write(0, fill(1, 4), 1)
    replica.write(2 * MIB, fill(3), 1)
    first, later = sid(), sid()
    replica.take_snapshot(first, 0.0)
    replica.write(B, fill(2), 2)
    replica.trim(2 * MIB, B, 3)
    replica.write(3 * MIB, fill(4), 4)
    replica.take_snapshot(later, 0.0)
    assert replica.revert(first, 5) == 3 * B  # one overwritten, one trimmed, one new
    assert replica.read(0, 4 * B) == fill(1, 4)
    assert replica.read(2 * MIB, B) == fill(3)
    assert replica.read(3 * MIB, B) == bytes(B)
    assert replica.read_snapshot(later, B, B) == fill(2)  # later snapshots keep theirs
    assert replica.read_snapshot(later, 3 * MIB, B) == fill(4)
    with pytest.raises(SnapshotNotFound):
        replica.revert(sid(), 6)


def test_changed_chunks_between_snapshots(store: ChunkStore) -> None:
    replica = store.create(sid(), 8 * MIB)
    replica.write(0, fill(1), 1)
    replica.write(5 * MIB, fill(1), 1)
    a, b = sid(), sid()
    replica.take_snapshot(a, 0.0)
    replica.write(2 * MIB, fill(2), 2)
    replica.trim(5 * MIB, B, 3)
    replica.take_snapshot(b, 0.0)
    replica.write(7 * MIB, fill(3), 4)
    assert replica.changed_chunks() == [0, 2, 7]  # the chunks holding data now
    assert replica.changed_chunks("", a) == [0, 5]
    assert replica.changed_chunks(a, b) == [2, 5]
    assert replica.changed_chunks(b, "") == [7]
    assert replica.changed_chunks(a, "") == [2, 5, 7]
    with pytest.raises(SnapshotNotFound):
        replica.changed_chunks(sid(), "")


def test_scrub_finds_and_repair_mends_a_damaged_snapshot_block(tmp_path: Path) -> None:
    disk = DiskChunkStore(tmp_path)
    try:
        v, s = sid(), sid()
        replica = disk.create(v, 4 * MIB)
        replica.write(0, fill(1, 2), 1)
        replica.take_snapshot(s, 0.0)
        replica.write(0, fill(2, 2), 2)  # the snapshot's blocks stay home, the head moves
        replica.flush()
        assert replica.scrub_snapshots() == []
        with open(tmp_path / "replicas" / v / "data", "r+b") as f:  # a bad disk, home block 1
            f.seek(B)
            f.write(b"\xff")
        assert replica.scrub_snapshots() == [(s, B)]
        assert replica.read(0, 2 * B) == fill(2, 2)  # the head is not hurt
        with pytest.raises(InvalidArgument):
            replica.repair_snapshot(s, B, fill(7))  # not what the checksum says
        replica.repair_snapshot(s, B, fill(1))
        assert replica.scrub_snapshots() == []
        assert replica.read_snapshot(s, 0, 2 * B) == fill(1, 2)
    finally:
        disk.close()
