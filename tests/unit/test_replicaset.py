"""The engine's replica set with fake data clients: fan-out and failure ordering."""

from __future__ import annotations

import asyncio
import uuid
from array import array
from pathlib import Path
from typing import Any

import pytest

from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.models import DataServer, Replica, Volume
from cargohold.errors import (
    ChecksumMismatch,
    DataServerUnavailable,
    Fenced,
    LeaseLost,
    NoReplicaLeft,
    NoSpace,
)
from cargohold.services.engine.replicaset import Member, ReplicaSet
from cargohold.stores.diskstore import DiskChunkStore


class FakeClient:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail = fail
        self.blocks: dict[int, bytes] = {}
        self.closed = False
        self.gens = [0] * 16
        self.hang = False  # writes wait until the connection is aborted
        self.waiting: list[asyncio.Future[None]] = []

    def abort(self) -> None:
        for waiter in self.waiting:
            if not waiter.done():
                waiter.set_exception(DataServerUnavailable(server=self.name, address="-",
                                                           detail="aborted"))

    async def write(self, _vid: str, _epoch: int, offset: int, data: bytes, gen: int) -> None:
        await asyncio.sleep(0)
        if self.hang:
            self.waiting.append(asyncio.get_running_loop().create_future())
            await self.waiting[-1]
        if self.fail:
            raise DataServerUnavailable(server=self.name, address="-", detail="gone")
        self.blocks[offset] = data
        self.gens[offset // CHUNK_SIZE] = max(self.gens[offset // CHUNK_SIZE], gen)
        self.log.append(f"write {self.name} gen={gen}")

    async def read(self, _vid: str, _epoch: int, offset: int, length: int) -> bytes:
        if self.fail:
            raise DataServerUnavailable(server=self.name, address="-", detail="gone")
        return self.blocks.get(offset, bytes(length))[:length]

    def start_write(self, vid: str, epoch: int, offset: int, data: bytes, generation: int,
                    shared_at: int = -1) -> asyncio.Future[None]:
        return asyncio.ensure_future(self.write(vid, epoch, offset, data, generation))

    def start_read(self, *args: Any) -> asyncio.Future[bytes]:
        return asyncio.ensure_future(self.read(*args))

    async def flush(self, _vid: str, _epoch: int) -> None:
        if self.fail:
            raise DataServerUnavailable(server=self.name, address="-", detail="gone")
        self.log.append(f"flush {self.name}")

    async def close(self) -> None:
        self.closed = True

    async def generations(self, _vid: str, timeout: float = 0.0) -> bytes:
        return array("Q", self.gens).tobytes()


def _set(fail: tuple[bool, ...]) -> tuple[ReplicaSet, list[str], list[FakeClient]]:
    log: list[str] = []
    servers = {f"s{i}": DataServer(id=f"s{i}", node="n", address="-", path="-")
               for i in range(len(fail))}
    volume = Volume(id="v" * 32, name="vol", size=1 << 24, replica_count=len(fail), fs="ext4",
                    replicas=[Replica(server=s) for s in servers])

    async def mark(server_id: str, reason: str) -> None:
        await asyncio.sleep(0.01)
        log.append(f"marked {server_id}")

    rs = ReplicaSet(volume, servers, epoch=3, local_node="n", mark_failed=mark)
    clients = [FakeClient(f"s{i}", log, f) for i, f in enumerate(fail)]
    rs.members = [Member(servers[c.name], c) for c in clients]  # type: ignore[arg-type]
    return rs, log, clients


def test_write_reaches_every_replica_with_one_generation() -> None:
    rs, log, clients = _set((False, False))
    asyncio.run(rs.write(4096, b"x" * 4096))
    assert sorted(log) == [f"write s0 gen={(3 << 32) + 1}", f"write s1 gen={(3 << 32) + 1}"]
    assert all(c.blocks[4096] == b"x" * 4096 for c in clients)


def test_failed_replica_is_marked_before_the_write_returns() -> None:
    rs, log, clients = _set((False, True))

    async def run() -> list[str]:
        await rs.write(0, b"y" * 4096)
        return list(log)  # what had happened when the write was acknowledged

    seen = asyncio.run(run())
    assert "marked s1" in seen
    assert [m.server.id for m in rs.members] == ["s0"]
    asyncio.run(rs.flush())
    assert log[-1] == "flush s0"  # the dropped replica gets no more I/O


def test_concurrent_failures_mark_a_replica_once() -> None:
    rs, log, _ = _set((False, True))

    async def run() -> None:
        await asyncio.gather(*(rs.write(i * 4096, b"z" * 4096) for i in range(20)))

    asyncio.run(run())
    assert log.count("marked s1") == 1


def test_all_replicas_failing_fails_the_io() -> None:
    rs, _, _ = _set((True, True))
    with pytest.raises(NoReplicaLeft):
        asyncio.run(rs.write(0, b"a" * 4096))


def test_fenced_is_raised_not_hidden() -> None:
    rs, log, clients = _set((False, False))

    async def fenced(*_a: Any) -> None:
        raise Fenced(volume_id="v", epoch=3, current=4)

    clients[0].write = fenced  # type: ignore[method-assign]
    with pytest.raises(Fenced):
        asyncio.run(rs.write(0, b"a" * 4096))
    assert not any(line.startswith("marked") for line in log)


def test_read_falls_over_to_the_next_replica_and_handles_unaligned_io() -> None:
    rs, log, clients = _set((False, False))
    asyncio.run(rs.write(0, bytes(range(256)) * 16))
    clients[0].fail = True
    assert asyncio.run(rs.read(10, 20)) == (bytes(range(256)) * 16)[10:30]
    assert "marked s0" in log
    asyncio.run(rs.write(100, b"Q" * 10))  # read-modify-write of one block
    assert clients[1].blocks[0][100:110] == b"Q" * 10


def test_reconcile_copies_only_chunks_whose_generations_differ() -> None:
    rs, log, clients = _set((False, False, False))
    newest = b"N" * CHUNK_SIZE
    clients[0].blocks[3 * CHUNK_SIZE] = newest  # the writer died after one replica got it
    clients[0].gens[3] = 9
    for c in clients:
        c.gens[5] = 4  # agreeing chunks are left alone
    assert asyncio.run(rs.reconcile()) == 1
    assert all(c.blocks[3 * CHUNK_SIZE] == newest and c.gens[3] == 9 for c in clients)
    assert sorted(line for line in log if line.startswith("write")) == [
        "write s1 gen=9", "write s2 gen=9"]
    assert asyncio.run(rs.reconcile()) == 0


def test_once_fenced_every_io_fails_at_once() -> None:
    rs, log, clients = _set((False, False))

    async def fenced(*_a: Any) -> None:
        raise Fenced(volume_id="v", epoch=3, current=4)

    clients[0].write = fenced  # type: ignore[method-assign]
    with pytest.raises(Fenced):
        asyncio.run(rs.write(0, b"a" * 4096))
    count = len(log)
    for io in (rs.read(0, 4096), rs.flush(), rs.write(4096, b"b" * 4096)):
        with pytest.raises(Fenced):
            asyncio.run(io)
    assert len(log) == count  # nothing more reached any replica


def test_a_lost_lease_fails_io_in_flight_and_later_and_marks_no_replica() -> None:
    rs, log, clients = _set((False, False))
    clients[1].hang = True  # its host is cut off: the write never comes back by itself

    async def run() -> None:
        pending = asyncio.ensure_future(rs.write(0, b"a" * 4096))
        await asyncio.sleep(0.05)
        assert not pending.done()
        rs.lose_lease(LeaseLost(node="n", detail="it expired"))
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(pending, 2)
        for io in (rs.read(0, 4096), rs.flush(), rs.write(4096, b"b" * 4096)):
            with pytest.raises(LeaseLost):
                await io

    asyncio.run(run())
    assert not any(line.startswith("marked") for line in log)
    assert [m.server.id for m in rs.members] == ["s0", "s1"]


def test_write_waits_for_a_replica_another_write_is_marking() -> None:
    """A write that skipped a replica being dropped completes only once it is recorded."""
    rs, log, clients = _set((False, True))

    async def run() -> list[str]:
        first = rs.start_write(0, b"a" * 4096)  # s1 fails: marked out of sync (takes 10 ms)
        await asyncio.sleep(0.001)  # s1 has left the set, its marking is under way
        assert [m.server.id for m in rs.members] == ["s0"]
        await rs.start_write(4096, b"b" * 4096)  # reaches s0 only
        seen = list(log)
        await first
        return seen

    assert "marked s1" in asyncio.run(run())


# -- catching up while in use -------------------------------------------------------------

SIZE = 1 << 24  # the volume of _set: 16 chunks


class DiskClient(FakeClient):
    """A fake data server holding a whole volume, for catch-up: bytes, generations, fence."""

    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        super().__init__(name, log, fail)
        self.data = bytearray(SIZE)
        self.read_gate: asyncio.Event | None = None  # reads wait for it when set
        self.fence_error: Exception | None = None
        self.corrupt: set[int] = set()  # chunks whose copy here fails its checksum

    async def connect(self, timeout: float = 0.0) -> None:
        pass

    async def fence(self, _vid: str, _epoch: int, timeout: float = 0.0) -> None:
        if self.fence_error is not None:
            raise self.fence_error

    async def stat(self, _vid: str, timeout: float = 0.0) -> dict[str, int]:
        return {"size": SIZE}

    async def snapshots(self, _vid: str, timeout: float = 0.0) -> list[dict[str, object]]:
        return []  # no snapshots here: a catch-up gives none first

    async def scrub_snapshots(self, _vid: str, _epoch: int,
                              timeout: float | None = 0.0) -> list[tuple[str, int]]:
        return []  # no snapshot blocks apart from the head to read

    async def write(self, _vid: str, _epoch: int, offset: int, data: bytes, gen: int) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise DataServerUnavailable(server=self.name, address="-", detail="gone")
        self.data[offset:offset + len(data)] = data
        self.corrupt -= set(range(offset // CHUNK_SIZE, (offset + len(data) - 1) // CHUNK_SIZE + 1))
        for chunk in range(offset // CHUNK_SIZE, (offset + len(data) - 1) // CHUNK_SIZE + 1):
            self.gens[chunk] = max(self.gens[chunk], gen)
        self.log.append(f"write {self.name} {offset // CHUNK_SIZE} gen={gen}")

    async def read(self, _vid: str, _epoch: int, offset: int, length: int) -> bytes:
        if self.read_gate is not None:
            await self.read_gate.wait()
        if offset // CHUNK_SIZE in self.corrupt:
            raise ChecksumMismatch(server=self.name, volume_id="v", offset=offset)
        return bytes(self.data[offset:offset + length])

    async def trim(self, _vid: str, _epoch: int, offset: int, length: int, gen: int,
                   copy: bool = False) -> None:
        self.data[offset:offset + length] = bytes(length)
        for chunk in range(offset // CHUNK_SIZE, (offset + length - 1) // CHUNK_SIZE + 1):
            if copy or self.gens[chunk]:
                self.gens[chunk] = max(self.gens[chunk], gen)
        self.log.append(f"trim {self.name} {offset // CHUNK_SIZE} gen={gen}"
                        + (" copy" if copy else ""))


def _disk_set() -> tuple[ReplicaSet, list[str], list[DiskClient], DiskClient, list[str]]:
    """Two members with data in chunks 0-5; a joining replica on s2 that has chunks 0-3 and
    missed 4-5."""
    rs, log, _ = _set((False, False))
    clients = [DiskClient(f"s{i}", log) for i in range(2)]
    for member, client in zip(rs.members, clients, strict=True):
        member.client = client  # type: ignore[assignment]

    async def fill() -> None:
        for chunk in range(4):
            await rs.write(chunk * CHUNK_SIZE, bytes([chunk + 1]) * CHUNK_SIZE)

    asyncio.run(fill())
    target = DiskClient("s2", log)
    target.data[:] = clients[0].data
    target.gens = list(clients[0].gens)

    async def missed() -> None:
        for chunk in (4, 5):
            await rs.write(chunk * CHUNK_SIZE + 8192, b"m" * 4096)

    asyncio.run(missed())
    promoted: list[str] = []
    return rs, log, clients, target, promoted


async def _catch_up(rs: ReplicaSet, target: DiskClient, promoted: list[str]) -> tuple[int, int]:
    async def promote() -> None:
        promoted.append("s2")

    async def progress(_done: float) -> None:
        pass

    rs.client_for = lambda _server: target  # type: ignore[method-assign,assignment,return-value]
    server = DataServer(id="s2", node="n", address="-", path="-")
    return await rs.catch_up(server, _begun, promote, progress)


async def _begun() -> None:
    pass


def test_catch_up_copies_only_missed_chunks_while_writes_go_on() -> None:
    rs, log, clients, target, promoted = _disk_set()

    async def run() -> tuple[int, int]:
        catching = asyncio.ensure_future(_catch_up(rs, target, promoted))
        for i in range(50):  # the application keeps writing, also into chunk 4
            await rs.write((4 + i % 6) * CHUNK_SIZE + (i % 64) * 4096, bytes([i]) * 4096)
        return await catching

    copied, total = asyncio.run(run())
    assert (copied, total) == (2, 16)  # chunks 4 and 5 only
    assert promoted == ["s2"]
    # every fake server is on this host, and a local replica is read first: it goes first
    assert [m.server.id for m in rs.members] == ["s2", "s0", "s1"] and not rs.joining
    assert target.data == clients[0].data == clients[1].data
    assert target.gens == clients[0].gens
    asyncio.run(rs.flush())
    assert "flush s2" in log[-3:]  # a member now: flushed like the others


def test_a_replica_that_missed_a_trim_gets_the_trimmed_chunk() -> None:
    """A trim is recorded like a write: the replica that was away reads zeros there too."""
    rs, log, clients, target, promoted = _disk_set()
    before = max(clients[0].gens)
    asyncio.run(rs.trim(CHUNK_SIZE, CHUNK_SIZE))  # chunk 1: s2 had its old bytes
    generation = clients[0].gens[1]
    assert generation > before and generation > target.gens[1]
    assert [line for line in log if line.startswith("trim")] == [
        f"trim s0 1 gen={generation}", f"trim s1 1 gen={generation}"]
    copied, _ = asyncio.run(_catch_up(rs, target, promoted))
    assert copied == 3  # chunks 1, 4 and 5
    assert f"trim s2 1 gen={generation} copy" in log  # copied as a trim: it stays thin
    assert target.data[CHUNK_SIZE:2 * CHUNK_SIZE] == bytes(CHUNK_SIZE)
    assert target.data == clients[0].data and target.gens == clients[0].gens


def test_a_write_to_a_chunk_being_copied_lands_after_the_copy() -> None:
    rs, log, clients, target, promoted = _disk_set()
    for client in clients:
        client.read_gate = asyncio.Event()  # the copy's read of chunk 4 waits

    async def run() -> None:
        catching = asyncio.ensure_future(_catch_up(rs, target, promoted))
        while 4 not in rs._locked:
            await asyncio.sleep(0)
        write = asyncio.ensure_future(rs.write(4 * CHUNK_SIZE, b"W" * 4096))
        await asyncio.sleep(0.01)
        assert not write.done(), "a write to a chunk being copied waits for the copy"
        for client in clients:
            assert client.read_gate is not None
            client.read_gate.set()
        await write
        await catching

    asyncio.run(run())
    assert target.data[4 * CHUNK_SIZE:4 * CHUNK_SIZE + 4096] == b"W" * 4096
    assert target.data == clients[0].data


def test_a_replica_that_fails_while_catching_up_costs_no_io() -> None:
    rs, log, clients, target, promoted = _disk_set()
    target.fail = True  # it takes no write

    async def run() -> None:
        with pytest.raises(DataServerUnavailable):
            await asyncio.gather(_catch_up(rs, target, promoted),
                                 rs.write(7 * CHUNK_SIZE, b"k" * 4096))

    asyncio.run(run())
    assert not promoted and not rs.joining
    assert [m.server.id for m in rs.members] == ["s0", "s1"]
    assert not any(line.startswith("marked") for line in log)
    assert clients[0].data[7 * CHUNK_SIZE:7 * CHUNK_SIZE + 4096] == b"k" * 4096
    asyncio.run(rs.write(0, b"z" * 4096))  # the fast path is back
    assert not rs._careful


def test_a_full_data_server_at_attach_marks_nothing_and_says_so() -> None:
    rs, log, _ = _set((False, False))
    rs.members = []
    clients: dict[str, DiskClient] = {}

    def client_for(server: DataServer) -> DiskClient:
        clients[server.id] = DiskClient(server.id, log)
        if server.id == "s1":  # cannot store the fence: its disk is full
            clients[server.id].fence_error = NoSpace(server="s1", detail="0B free of 96M")
        return clients[server.id]

    rs.client_for = client_for  # type: ignore[method-assign,assignment]
    with pytest.raises(NoSpace, match="0B free"):
        asyncio.run(rs.open())
    assert not any(line.startswith("marked") for line in log)
    assert all(c.closed for c in clients.values()) and not rs.members


def test_scrub_in_use_rewrites_a_bad_copy_and_holds_writes_to_that_chunk() -> None:
    rs, log, clients, _, _ = _disk_set()
    clients[1].corrupt.add(2)
    clients[1].data[2 * CHUNK_SIZE] ^= 0xFF
    clients[0].read_gate = asyncio.Event()

    async def run() -> Any:
        scrub = asyncio.ensure_future(rs.scrub())
        while not rs._locked:
            await asyncio.sleep(0)
        locked = next(iter(rs._locked))
        write = asyncio.ensure_future(rs.write(locked * CHUNK_SIZE, b"W" * 4096))
        await asyncio.sleep(0.01)
        assert not write.done(), "a write to the chunk being scrubbed waits"
        assert clients[0].read_gate is not None
        clients[0].read_gate.set()
        await write
        return await scrub

    report = asyncio.run(run())
    assert report.repaired == [{"chunk": 2, "server": "s1"}] and report.lost == []
    assert report.chunks == 6  # chunks 0-5 were written; the rest are thin
    assert clients[0].data == clients[1].data
    assert not rs._careful and not any(line.startswith("marked") for line in log)


def test_reads_come_from_the_local_replica_files_while_it_is_the_first_member(
        tmp_path: Path) -> None:
    """The first member on this host is read from its files; once it leaves, from a client."""
    store = DiskChunkStore(tmp_path)
    try:
        rs, log, clients = _set((False, False))
        rs.volume_id = vid = uuid.uuid4().hex
        store.create(vid, rs.size).write(0, b"L" * 4096, 1)  # what the local files hold
        local = DataServer(id="s0", node="n", address="-", path=str(tmp_path))
        rs.members[0] = Member(local, clients[0])  # type: ignore[arg-type]
        rs._choose_reader()
        assert rs.read_at_once(0, 4096) == b"L" * 4096
        assert rs.read_at_once(10, 4096) is None  # unaligned: through a client
        elsewhere = DataServer(id="s0", node="other", address="-", path=str(tmp_path))
        rs.members[0] = Member(elsewhere, clients[0])  # type: ignore[arg-type]
        rs._choose_reader()
        assert rs.read_at_once(0, 4096) is None  # not on this host: never read directly
        rs.members[0] = Member(local, clients[0])  # type: ignore[arg-type]
        rs._choose_reader()
        clients[0].fail = True
        asyncio.run(rs.write(4096, b"w" * 4096))  # s0 fails and leaves the in-sync set
        assert "marked s0" in log and [m.server.id for m in rs.members] == ["s1"]
        assert rs.read_at_once(0, 4096) is None  # its files are not read any more
        asyncio.run(rs.close())
        assert rs._reader is None
    finally:
        store.close()
