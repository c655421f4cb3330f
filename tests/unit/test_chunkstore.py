"""One contract suite for every ChunkStore implementation (memory and disk)."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE, runs
from cargohold.errors import ChecksumMismatch, Fenced, InvalidArgument, NoSpace, ReplicaNotFound
from cargohold.services.engine.localreader import LocalReplicaReader
from cargohold.stores import diskstore, epochfile, spacereserve, sparsefile
from cargohold.stores.chunkstore import ChunkStore, MemoryChunkStore
from cargohold.stores.diskstore import DiskChunkStore
from tests.pagecache import PAGE, cached

MIB = 1 << 20
GIB = 1 << 30


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    made: ChunkStore = MemoryChunkStore() if request.param == "memory" else DiskChunkStore(tmp_path)
    yield made
    made.close()


@pytest.fixture
def make_disk(tmp_path: Path) -> Iterator[Callable[[], DiskChunkStore]]:
    """Opens (and reopens) a disk store in one directory."""
    opened: list[DiskChunkStore] = []

    def make() -> DiskChunkStore:
        opened.append(DiskChunkStore(tmp_path))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def disk(make_disk: Callable[[], DiskChunkStore]) -> DiskChunkStore:
    return make_disk()


def vid() -> str:
    return uuid.uuid4().hex


def gens(raw: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw))


def test_create_is_idempotent_for_the_same_size(store: ChunkStore) -> None:
    v = vid()
    store.create(v, 16 * MIB)
    store.create(v, 16 * MIB)
    assert store.replica_ids() == [v]
    with pytest.raises(InvalidArgument, match="size"):
        store.create(v, 32 * MIB)
    assert store.provisioned() == 16 * MIB


@pytest.mark.parametrize("size", [0, -4096, 4095, 5000])
def test_create_refuses_bad_sizes(store: ChunkStore, size: int) -> None:
    with pytest.raises(InvalidArgument):
        store.create(vid(), size)
    assert store.replica_ids() == []


@pytest.mark.parametrize("bad", ["", "../etc", "A" * 32, "0" * 32, "abc"])
def test_create_refuses_bad_volume_ids(store: ChunkStore, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        store.create(bad, MIB)


def test_delete_is_idempotent(store: ChunkStore) -> None:
    v = vid()
    store.create(v, MIB).write(0, b"x" * BLOCK_SIZE, 1)
    store.delete(v)
    store.delete(v)
    assert store.replica_ids() == []
    with pytest.raises(ReplicaNotFound):
        store.replica(v)
    assert store.used() == 0


def test_unknown_replica_is_not_found(store: ChunkStore) -> None:
    with pytest.raises(ReplicaNotFound):
        store.replica(vid())


def test_thin_reads_are_zeros(store: ChunkStore) -> None:
    replica = store.create(vid(), 8 * MIB)
    assert replica.read(0, 2 * MIB) == bytes(2 * MIB)
    assert replica.read(8 * MIB - BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)
    assert replica.read(0, 0) == b""
    assert replica.info().used == 0


def test_write_read_round_trip_across_a_chunk_boundary(store: ChunkStore) -> None:
    replica = store.create(vid(), 8 * MIB)
    data = os.urandom(MIB)
    start = CHUNK_SIZE - 256 * 1024  # straddles chunks 0 and 1
    replica.write(start, data, 1)
    assert replica.read(start, MIB) == data
    # partly written ranges: zeros around the data
    around = replica.read(start - BLOCK_SIZE, MIB + 2 * BLOCK_SIZE)
    assert around == bytes(BLOCK_SIZE) + data + bytes(BLOCK_SIZE)
    replica.write(start + BLOCK_SIZE, b"y" * BLOCK_SIZE, 2)
    assert replica.read(start, 2 * BLOCK_SIZE) == data[:BLOCK_SIZE] + b"y" * BLOCK_SIZE


def test_writes_accept_any_buffer(store: ChunkStore) -> None:
    replica = store.create(vid(), MIB)
    replica.write(0, bytearray(b"a" * BLOCK_SIZE), 1)
    replica.write(BLOCK_SIZE, memoryview(b"b" * 2 * BLOCK_SIZE)[BLOCK_SIZE:], 1)
    assert replica.read(0, 2 * BLOCK_SIZE) == b"a" * BLOCK_SIZE + b"b" * BLOCK_SIZE


def test_generations_keep_the_highest_per_chunk(store: ChunkStore) -> None:
    replica = store.create(vid(), 4 * MIB)
    assert gens(replica.generations()) == [0, 0, 0, 0]
    replica.write(CHUNK_SIZE - BLOCK_SIZE, b"a" * 2 * BLOCK_SIZE, 5)
    assert gens(replica.generations()) == [5, 5, 0, 0]
    replica.write(0, b"b" * BLOCK_SIZE, 3)  # older generation: no going back
    replica.write(3 * CHUNK_SIZE, b"c" * BLOCK_SIZE, 7)
    assert gens(replica.generations()) == [5, 5, 0, 7]
    assert replica.info().chunks_written == 3


def test_trims_take_generations_on_written_chunks_only(store: ChunkStore) -> None:
    """A trim's generation lands where something was written (a replica that missed it must
    be caught up); trimming free space leaves never-written chunks at 0. A copy's trim
    (zeros copied from a replica that wrote and then trimmed) records it everywhere."""
    replica = store.create(vid(), 4 * MIB)
    replica.write(CHUNK_SIZE - BLOCK_SIZE, b"a" * BLOCK_SIZE, 5)
    replica.trim(0, 3 * CHUNK_SIZE, 7)
    assert gens(replica.generations()) == [7, 0, 0, 0]
    assert replica.info().chunks_written == 1
    replica.trim(2 * CHUNK_SIZE, 2 * CHUNK_SIZE, 8, every_chunk=True)
    assert gens(replica.generations()) == [7, 0, 8, 8]
    assert replica.read(0, 4 * MIB) == bytes(4 * MIB)


def test_generations_by_range(store: ChunkStore) -> None:
    replica = store.create(vid(), 5 * MIB)
    for chunk in range(5):
        replica.write(chunk * CHUNK_SIZE, b"r" * BLOCK_SIZE, 10 + chunk)
    assert gens(replica.generations(1, 2)) == [11, 12]
    assert gens(replica.generations(3)) == [13, 14]
    assert gens(replica.generations(4, 100)) == [14]
    assert replica.generations(5) == b""
    for first, count in ((6, None), (-1, 1), (0, -1)):
        with pytest.raises(InvalidArgument):
            replica.generations(first, count)


def test_generations_cover_a_partial_last_chunk(store: ChunkStore) -> None:
    replica = store.create(vid(), CHUNK_SIZE + BLOCK_SIZE)
    replica.write(CHUNK_SIZE, b"z" * BLOCK_SIZE, 2)
    assert gens(replica.generations()) == [0, 2]


def test_fencing(store: ChunkStore) -> None:
    v = vid()
    replica = store.create(v, MIB)
    assert replica.epoch == 0
    replica.fence(3)
    replica.fence(3)  # equal is fine
    assert replica.epoch == 3
    with pytest.raises(Fenced) as caught:
        replica.fence(2)
    assert caught.value.fields == {"volume_id": v, "epoch": 2, "current": 3}
    replica.fence(4)
    assert store.replica(v).info().epoch == 4


def test_trim_reads_zeros_and_frees_space(store: ChunkStore) -> None:
    replica = store.create(vid(), 4 * MIB)
    replica.write(0, os.urandom(2 * MIB), 1)
    used = replica.info().used
    assert used >= 2 * MIB
    replica.trim(BLOCK_SIZE, CHUNK_SIZE, 4)
    assert replica.read(BLOCK_SIZE, CHUNK_SIZE) == bytes(CHUNK_SIZE)
    assert replica.read(0, BLOCK_SIZE) != bytes(BLOCK_SIZE)
    assert replica.info().used <= used - CHUNK_SIZE
    assert gens(replica.generations()) == [4, 4, 0, 0]
    replica.write(2 * BLOCK_SIZE, b"n" * BLOCK_SIZE, 5)  # written again after the trim
    assert replica.read(2 * BLOCK_SIZE, BLOCK_SIZE) == b"n" * BLOCK_SIZE


def test_trim_of_a_whole_big_volume_stays_thin(store: ChunkStore) -> None:
    replica = store.create(vid(), 64 * GIB)  # what mkfs does: discard everything
    replica.write(GIB, b"q" * BLOCK_SIZE, 1)
    replica.trim(0, 64 * GIB)
    assert replica.read(GIB, BLOCK_SIZE) == bytes(BLOCK_SIZE)
    assert replica.info().used == 0
    if isinstance(store, DiskChunkStore):
        sums = store.root / "replicas" / replica.volume_id / "sums"
        assert sums.stat().st_blocks * 512 <= 64 * 1024


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (1, BLOCK_SIZE),
        (0, 100),
        (BLOCK_SIZE + 512, BLOCK_SIZE),
        (-BLOCK_SIZE, BLOCK_SIZE),
        (MIB, BLOCK_SIZE),
        (MIB - BLOCK_SIZE, 2 * BLOCK_SIZE),
    ],
)
def test_alignment_and_bounds(store: ChunkStore, offset: int, length: int) -> None:
    replica = store.create(vid(), MIB)
    with pytest.raises(InvalidArgument):
        replica.read(offset, length)
    with pytest.raises(InvalidArgument):
        replica.write(offset, b"w" * length if length > 0 else b"", 1)
    with pytest.raises(InvalidArgument):
        replica.trim(offset, length)


def test_bad_generation_is_refused(store: ChunkStore) -> None:
    replica = store.create(vid(), MIB)
    with pytest.raises(InvalidArgument):
        replica.write(0, b"g" * BLOCK_SIZE, -1)
    with pytest.raises(InvalidArgument):
        replica.write(0, b"g" * BLOCK_SIZE, 1 << 64)


def test_used_stays_small_for_a_big_sparse_volume(store: ChunkStore) -> None:
    replica = store.create(vid(), 256 * GIB)
    for i in range(8):
        replica.write(i * 31 * GIB, b"s" * BLOCK_SIZE, i + 1)
    assert replica.info().used <= 8 * 64 * 1024
    assert store.used() == replica.info().used
    assert store.provisioned() == 256 * GIB
    assert replica.read(31 * GIB, BLOCK_SIZE) == b"s" * BLOCK_SIZE
    assert replica.info().chunks_written == 8


def test_server_level_figures(store: ChunkStore) -> None:
    assert len(store.server_id) == 32
    assert 0 <= store.free() <= store.capacity()
    a, b = vid(), vid()
    store.create(a, MIB)
    store.create(b, 2 * MIB)
    assert store.replica_ids() == sorted([a, b])
    assert store.provisioned() == 3 * MIB
    assert {r.volume_id for r in store.open_replicas()} <= {a, b}


def test_flush_is_callable_any_time(store: ChunkStore) -> None:
    replica = store.create(vid(), MIB)
    replica.flush()
    replica.write(0, b"f" * BLOCK_SIZE, 1)
    replica.flush()


def test_memory_store_runs_out_of_space() -> None:
    store = MemoryChunkStore(capacity=2 * BLOCK_SIZE)
    replica = store.create(vid(), MIB)
    replica.write(0, b"a" * 2 * BLOCK_SIZE, 1)
    with pytest.raises(NoSpace):
        replica.write(2 * BLOCK_SIZE, b"b" * BLOCK_SIZE, 1)
    replica.write(0, b"c" * BLOCK_SIZE, 2)  # overwriting needs no new space


def test_memory_store_detects_corruption() -> None:
    replica = MemoryChunkStore().create(vid(), MIB)
    replica.write(0, b"a" * 2 * BLOCK_SIZE, 1)
    replica.corrupt(BLOCK_SIZE)  # type: ignore[attr-defined]
    with pytest.raises(ChecksumMismatch) as caught:
        replica.read(0, 2 * BLOCK_SIZE)
    assert caught.value.fields["offset"] == BLOCK_SIZE


# --- disk only -------------------------------------------------------------------------


def test_corrupt_byte_on_disk_is_caught(disk: DiskChunkStore) -> None:
    v = vid()
    replica = disk.create(v, 4 * MIB)
    replica.write(0, os.urandom(2 * MIB), 1)
    replica.flush()
    bad = CHUNK_SIZE + 5 * BLOCK_SIZE + 17
    with open(disk.root / "replicas" / v / "data", "r+b") as f:
        f.seek(bad)
        byte = f.read(1)
        f.seek(bad)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumMismatch) as caught:
        replica.read(0, 2 * MIB)
    assert caught.value.fields["offset"] == CHUNK_SIZE + 5 * BLOCK_SIZE
    assert replica.read(0, CHUNK_SIZE) is not None  # the good part still reads


def test_unflushed_data_without_checksum_reads_as_zeros(disk: DiskChunkStore) -> None:
    v = vid()
    replica = disk.create(v, MIB)
    # a crash kept the data page but not the checksum page: the block was never acknowledged
    with open(disk.root / "replicas" / v / "data", "r+b") as f:
        f.write(b"stale" * 1000)
    assert replica.read(0, 2 * BLOCK_SIZE) == bytes(2 * BLOCK_SIZE)


def test_persistence_across_reopen(make_disk: Callable[[], DiskChunkStore]) -> None:
    store = make_disk()
    v = vid()
    replica = store.create(v, 4 * MIB)
    data = os.urandom(MIB + BLOCK_SIZE)
    replica.write(CHUNK_SIZE, data, 6)
    replica.fence(9)
    replica.flush()
    server_id = store.server_id
    store.close()

    again = make_disk()
    assert again.server_id == server_id
    assert again.replica_ids() == [v]
    reopened = again.replica(v)
    assert reopened.read(CHUNK_SIZE, len(data)) == data
    assert reopened.epoch == 9
    assert gens(reopened.generations()) == [0, 6, 6, 0]
    assert reopened.info().chunks_written == 2
    assert again.provisioned() == 4 * MIB
    with pytest.raises(Fenced):
        reopened.fence(8)


def test_fencing_needs_no_free_space(make_disk: Callable[[], DiskChunkStore],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk still takes a new epoch: it overwrites the epoch file in place."""
    store = make_disk()
    v = vid()
    store.create(v, MIB).fence(2)
    store.close()

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskstore, "write_json_atomic", full)
    monkeypatch.setattr(diskstore, "make_epoch_file", full)
    replica = make_disk().replica(v)
    for epoch in (3, 4, 7):
        replica.fence(epoch)
    monkeypatch.undo()
    again = make_disk()  # the first store is never closed: like a crash
    assert again.replica(v).epoch == 7
    with pytest.raises(Fenced):
        again.replica(v).fence(6)


def test_a_torn_epoch_slot_keeps_the_previous_epoch(
        make_disk: Callable[[], DiskChunkStore]) -> None:
    store = make_disk()
    v = vid()
    replica = store.create(v, MIB)
    replica.fence(5)
    replica.fence(6)
    store.close()
    path = store.root / "replicas" / v / "epoch"
    raw = bytearray(path.read_bytes())
    newest = 0 if struct.unpack_from("<Q", raw, 0)[0] == 6 else 512
    raw[newest + 3] ^= 0xFF  # a crash in the middle of writing epoch 6
    path.write_bytes(bytes(raw))
    reopened = make_disk().replica(v)
    assert reopened.epoch == 5
    reopened.fence(8)  # overwrites the torn slot, keeps 5
    assert sorted(e or 0 for e in epochfile.read_epoch_slots(path.read_bytes())) == [5, 8]


def test_a_replica_without_an_epoch_file_gets_one(
        make_disk: Callable[[], DiskChunkStore]) -> None:
    """Replicas made before the epoch file keep their epoch (from meta.json) and gain it."""
    store = make_disk()
    v = vid()
    store.create(v, MIB).fence(4)
    store.close()
    path = store.root / "replicas" / v
    (path / "epoch").unlink()
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "epoch": 4}))
    reopened = make_disk().replica(v)
    assert reopened.epoch == 4
    assert (path / "epoch").exists()
    reopened.fence(5)
    assert make_disk().replica(v).epoch == 5


def test_delete_removes_the_directory(make_disk: Callable[[], DiskChunkStore]) -> None:
    store = make_disk()
    v = vid()
    store.create(v, 4 * MIB).write(0, os.urandom(MIB), 1)
    store.delete(v)
    store.close()  # waits for the background removal
    assert list((store.root / "replicas").iterdir()) == []


def test_reopen_removes_half_made_replicas(make_disk: Callable[[], DiskChunkStore]) -> None:
    store = make_disk()
    leftover = store.root / "replicas" / f".create-{vid()}-0000"
    leftover.mkdir()
    (leftover / "data").write_bytes(b"x")
    store.close()
    again = make_disk()
    assert again.replica_ids() == []
    assert not leftover.exists()


def test_server_record_keeps_extra_fields(make_disk: Callable[[], DiskChunkStore]) -> None:
    store = make_disk()
    store.update_server_record(port=12345)
    server_id = store.server_id
    store.close()
    again = make_disk()
    assert again.server_record() == {"id": server_id, "port": 12345}


def test_disk_layout(disk: DiskChunkStore) -> None:
    v = vid()
    disk.create(v, 3 * MIB).write(0, b"l" * BLOCK_SIZE, 1)
    path = disk.root / "replicas" / v
    assert sorted(p.name for p in path.iterdir()) == ["data", "epoch", "gens", "meta.json",
                                                       "sums"]
    assert (path / "epoch").stat().st_blocks * 512 >= BLOCK_SIZE  # allocated, not a hole
    assert (path / "data").stat().st_size == 3 * MIB
    assert (path / "sums").stat().st_size == 3 * MIB // BLOCK_SIZE * 4
    assert (path / "gens").stat().st_size == 3 * 8
    assert (disk.root / "server.json").exists()


def test_large_writes_reach_the_file_whole_in_pieces(disk: DiskChunkStore) -> None:
    v = vid()
    replica = disk.create(v, 4 * MIB)
    data = os.urandom(100 * BLOCK_SIZE)  # 400 KiB: six whole 64 KiB pieces and a partial one
    replica.write(3 * BLOCK_SIZE, data, 1)
    assert replica.read(3 * BLOCK_SIZE, len(data)) == data  # every block's checksum matches
    with open(disk.root / "replicas" / v / "data", "rb") as f:
        f.seek(3 * BLOCK_SIZE)
        assert f.read(len(data)) == data


# -- the engine's direct reader of a replica on its own host --------------------------


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_local_reader_reads_what_the_replica_reads(disk: DiskChunkStore) -> None:
    v = vid()
    replica = disk.create(v, 4 * MIB)
    replica.fence(3)
    data = os.urandom(CHUNK_SIZE + 3 * BLOCK_SIZE)
    replica.write(BLOCK_SIZE, data, 1)
    reader = LocalReplicaReader(disk.root, v, 3)
    try:
        for offset, length in [(BLOCK_SIZE, BLOCK_SIZE), (0, 4 * BLOCK_SIZE),
                               (BLOCK_SIZE, len(data)), (2 * MIB, MIB), (0, 4 * MIB),
                               (4 * MIB - BLOCK_SIZE, BLOCK_SIZE)]:
            got = reader.read(offset, length)
            assert got is not None and bytes(got) == replica.read(offset, length), (offset, length)
        # a write through the data server is seen by the next read (the same page cache)
        replica.write(BLOCK_SIZE, b"\x07" * BLOCK_SIZE, 2)
        assert reader.read(BLOCK_SIZE, BLOCK_SIZE) == b"\x07" * BLOCK_SIZE
        replica.trim(0, CHUNK_SIZE)
        assert reader.read(BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)
    finally:
        reader.close()


def test_local_reader_declines_what_it_cannot_vouch_for(disk: DiskChunkStore) -> None:
    v = vid()
    replica = disk.create(v, 4 * MIB)
    replica.write(0, os.urandom(8 * BLOCK_SIZE), 1)
    replica.flush()
    reader = LocalReplicaReader(disk.root, v, 0)
    try:
        _flip(disk.root / "replicas" / v / "data", 5 * BLOCK_SIZE + 9)
        assert reader.read(5 * BLOCK_SIZE, BLOCK_SIZE) is None  # a corrupt block
        assert reader.read(0, 8 * BLOCK_SIZE) is None  # a longer read over it
        assert reader.read(4 * BLOCK_SIZE, BLOCK_SIZE) is not None  # its neighbour is fine
        assert reader.read(4 * MIB, BLOCK_SIZE) is None  # beyond what it mapped
        # data without a checksum (a crash before a flush) reads as zeros, as from the data
        # server; next to a written block, the data server sorts it out
        _flip(disk.root / "replicas" / v / "data", 3 * MIB)
        assert reader.read(3 * MIB, BLOCK_SIZE) == bytes(BLOCK_SIZE) == replica.read(3 * MIB,
                                                                                    BLOCK_SIZE)
        replica.write(3 * MIB - BLOCK_SIZE, b"\x02" * BLOCK_SIZE, 1)
        assert reader.read(3 * MIB - BLOCK_SIZE, 2 * BLOCK_SIZE) is None
        # the replica grew: the reader declines the new range until it is reopened
        disk.grow(v, 8 * MIB)
        assert reader.read(6 * MIB, BLOCK_SIZE) is None
    finally:
        reader.close()
    reader = LocalReplicaReader(disk.root, v, 0)
    try:
        assert reader.size == 8 * MIB and reader.read(6 * MIB, BLOCK_SIZE) == bytes(BLOCK_SIZE)
    finally:
        reader.close()


def test_local_reader_stops_once_fenced_by_a_newer_attachment(disk: DiskChunkStore) -> None:
    v = vid()
    replica = disk.create(v, MIB)
    replica.fence(4)
    replica.write(0, b"\x01" * BLOCK_SIZE, 1)
    with pytest.raises(Fenced):
        LocalReplicaReader(disk.root, v, 3)  # already older than the replica's epoch
    reader = LocalReplicaReader(disk.root, v, 4)
    try:
        assert reader.read(0, BLOCK_SIZE) == b"\x01" * BLOCK_SIZE
        replica.fence(4)  # the same epoch again changes nothing
        assert reader.read(0, BLOCK_SIZE) == b"\x01" * BLOCK_SIZE
        replica.fence(5)  # attached elsewhere: the data server would refuse this engine
        assert reader.read(0, BLOCK_SIZE) is None
        assert reader.read(0, 2 * BLOCK_SIZE) is None
    finally:
        reader.close()


def test_local_reader_of_a_missing_replica_fails_and_leaves_nothing_open(
        disk: DiskChunkStore) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        LocalReplicaReader(disk.root, vid(), 1)
    with pytest.raises(InvalidArgument):
        LocalReplicaReader(disk.root, "../etc", 1)
    assert set(os.listdir("/proc/self/fd")) == before


def test_writeback_is_started_for_written_replicas_only(disk: DiskChunkStore) -> None:
    v = vid()
    replica = disk.create(v, 4 * MIB)
    assert replica.small_writes == 0
    replica.write(0, os.urandom(CHUNK_SIZE), 1)  # large writes are left to the kernel
    replica.write(CHUNK_SIZE, os.urandom(diskstore.SMALL_WRITE), 1)
    assert replica.small_writes == 0
    for k in range(3):
        replica.write(2 * MIB + k * BLOCK_SIZE, os.urandom(BLOCK_SIZE), 1)
    assert replica.small_writes == 3
    replica.start_writeback()  # starts writing, does not wait: the data is still all there
    assert replica.small_writes == 0
    replica.write(MIB, b"\x05" * BLOCK_SIZE, 2)
    assert replica.small_writes == 1
    assert replica.read(MIB, BLOCK_SIZE) == b"\x05" * BLOCK_SIZE
    disk.close()  # closed: nothing to start, and no error
    replica.start_writeback()


def test_a_bulk_copy_leaves_the_page_cache_behind_it(
        disk: DiskChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparsefile.DropBehind, "BEHIND", 2 * MIB)
    v, pages = vid(), MIB // PAGE
    replica = disk.create(v, 8 * MIB)
    data = [os.urandom(MIB) for _ in range(6)]
    for k in range(5):  # a copy of 5 MiB: what lies 2 MiB behind its end is written, dropped
        replica.write(k * MIB, data[k], 1)
        replica.copied(k * MIB, MIB)
    replica.write(5 * MIB, data[5], 1)  # an ordinary write stays in the cache
    now = cached(disk.root / "replicas" / v / "data", 6 * pages)
    assert not any(now[: 3 * pages])
    assert all(now[3 * pages :])
    assert replica.read(0, 6 * MIB) == b"".join(data)


def test_runs_of_chunks_for_writeback() -> None:
    assert list(runs([])) == []
    assert list(runs([3])) == [(3, 1)]
    assert list(runs([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 1), (7, 2)]


def test_the_reserve_sees_space_freed_before_it_refuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the reserve new chunks are refused; once space is freed (a delete and fstrim
    in the volume), the next write reads the free space again instead of being refused
    until the next timer turn."""
    free = [10 * MIB]
    real = os.statvfs

    def statvfs(path: Any) -> Any:
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, 1 << 20, free[0] // 4096,
                                  free[0] // 4096, *tuple(st)[5:]))

    monkeypatch.setattr(diskstore.os, "statvfs", statvfs)
    monkeypatch.setattr(spacereserve.SpaceReserve, "RECHECK_SHORT", 0.0)
    reserve = spacereserve.SpaceReserve(tmp_path, 64 * MIB)
    with pytest.raises(NoSpace, match="reserve"):
        reserve.allocate(CHUNK_SIZE, "s")
    free[0] = 1 << 30  # freed
    reserve.allocate(CHUNK_SIZE, "s")  # read again, not refused
    assert not reserve.short


def test_fill_writes_only_chunks_never_written_and_keeps_holes(store: ChunkStore) -> None:
    """A clone's first contents: never over what its writer wrote, zeros stay holes."""
    v = vid()
    replica = store.create(v, 3 * MIB + 64 * 1024)
    replica.write(MIB + 4096, b"w" * 4096, 5)  # the writer came first in chunk 1
    source = bytearray(os.urandom(MIB))
    source[8192:16384] = bytes(8192)
    assert replica.fill(0, source, 1) is True
    assert replica.fill(MIB, b"s" * MIB, 1) is False
    assert replica.fill(0, b"t" * MIB, 1) is False  # filled already: a second fill loses
    assert replica.read(0, MIB) == source
    assert replica.read(MIB, 3 * 4096) == bytes(4096) + b"w" * 4096 + bytes(4096)
    used = replica.info().used
    assert replica.fill(2 * MIB, bytes(MIB), 1) is True  # all zeros: filled, nothing stored
    assert replica.info().used == used
    assert replica.fill(3 * MIB, b"e" * 65536, 1) is True  # the short last chunk
    assert gens(replica.generations()) == [1, 5, 1, 1]
    assert used <= MIB - 8192 + MIB  # the zero blocks of chunk 0 were not stored
    for offset, data in [(4096, b"x" * 4096), (0, b"x" * 100), (0, b"x" * (MIB + 4096))]:
        with pytest.raises(InvalidArgument):
            replica.fill(offset, data, 1)
    with pytest.raises(InvalidArgument):
        replica.fill(4 * MIB, b"x" * 4096, 1)  # past the end


def evict(directory: Path) -> None:
    """Write back, then drop from the page cache, every file of a replica."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_a_read_that_would_wait_for_the_disk_is_not_done_by_read_cached(
        disk: DiskChunkStore) -> None:
    v = vid()
    replica = disk.create(v, 4 * MIB)
    data = os.urandom(MIB)
    replica.write(0, data, 1)
    replica.take_snapshot(uuid.uuid4().hex, 1.0)
    replica.write(4 * BLOCK_SIZE, b"n" * 2 * BLOCK_SIZE, 2)  # blocks 4 and 5 move
    want = data[:4 * BLOCK_SIZE] + b"n" * 2 * BLOCK_SIZE + data[6 * BLOCK_SIZE:]
    replica.flush()
    evict(disk.root / "replicas" / v)
    # cold: one block, several, moved or not: nothing read (the server leaves it to a thread)
    for offset, length in ((0, BLOCK_SIZE), (8 * BLOCK_SIZE, 3 * BLOCK_SIZE),
                           (4 * BLOCK_SIZE, BLOCK_SIZE), (2 * BLOCK_SIZE, 6 * BLOCK_SIZE)):
        assert replica.read_cached(offset, length) is None, (offset, length)
    assert replica.read_cached(2 * MIB, BLOCK_SIZE) == bytes(BLOCK_SIZE)  # never written
    assert replica.read(0, 16 * BLOCK_SIZE) == want[:16 * BLOCK_SIZE]  # now in the cache
    for offset, length in ((0, BLOCK_SIZE), (8 * BLOCK_SIZE, 3 * BLOCK_SIZE),
                           (4 * BLOCK_SIZE, BLOCK_SIZE), (2 * BLOCK_SIZE, 6 * BLOCK_SIZE)):
        assert replica.read_cached(offset, length) == want[offset:offset + length]
    with open(disk.root / "replicas" / v / "data", "r+b") as f:  # a bad block read from
        os.pwrite(f.fileno(), b"x", 9 * BLOCK_SIZE)  # the cache still raises
    with pytest.raises(ChecksumMismatch):
        replica.read_cached(8 * BLOCK_SIZE, 3 * BLOCK_SIZE)


def test_a_replica_in_memory_reads_at_once() -> None:
    replica = MemoryChunkStore().create(vid(), MIB)
    replica.write(0, b"m" * BLOCK_SIZE, 1)
    assert replica.read_cached(0, 2 * BLOCK_SIZE) == b"m" * BLOCK_SIZE + bytes(BLOCK_SIZE)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_file_system_that_cannot_say_what_it_holds_is_read_as_before(tmp_path: Path) -> None:
    """tmpfs refuses RWF_NOWAIT (EOPNOTSUPP): read_cached reads, as read does."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(tmp_path)],
                   check=True)
    store = DiskChunkStore(tmp_path / "disk")
    try:
        replica = store.create(vid(), 4 * MIB)
        data = os.urandom(8 * BLOCK_SIZE)
        replica.write(0, data, 1)
        assert replica.read_cached(0, BLOCK_SIZE) == data[:BLOCK_SIZE]
        assert replica.read_cached(0, 8 * BLOCK_SIZE) == data
        replica.take_snapshot(uuid.uuid4().hex, 1.0)
        replica.write(BLOCK_SIZE, b"m" * BLOCK_SIZE, 2)  # moved: read through versionmap
        assert replica.read_cached(0, 3 * BLOCK_SIZE) == (data[:BLOCK_SIZE] + b"m" * BLOCK_SIZE
                                                          + data[2 * BLOCK_SIZE:3 * BLOCK_SIZE])
    finally:
        store.close()
        subprocess.run(["umount", str(tmp_path)], check=True)
