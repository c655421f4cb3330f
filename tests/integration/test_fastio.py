"""The data server's plain writes served in C (adapters/dataserver/fastio.py), in a real
server on a disk store, through DataClient over TCP and the unix socket with shared write
buffers: the compiled path takes the writes, and everything the Python path guarantees
holds (fencing, snapshots, grow, delete, order within a connection); the same requests give
the same answers and the same replica files with and without it."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cargohold.adapters.dataserver import DataProtocolServer, fastio, serve
from cargohold.clients.dataclient import DataClient
from cargohold.clients.sharedmemory import SharedMemory
from cargohold.core import compiled, wire
from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE
from cargohold.errors import CargoholdError, ChecksumMismatch, Fenced, ReplicaNotFound
from cargohold.stores.diskstore import DiskChunkStore

pytestmark = pytest.mark.skipif(not fastio.built(), reason="the C was not built")
in_c = pytest.mark.skipif(not compiled.wanted(), reason=f"{compiled.VARIABLE}=0")
MIB = 1 << 20


def served(server: DataProtocolServer) -> int:
    return server.compiled()[0]


@asynccontextmanager
async def disk_server(root: Path) -> AsyncIterator[tuple[DataProtocolServer, DiskChunkStore]]:
    store = DiskChunkStore(root)
    server = await serve(store, "127.0.0.1", 0)
    await server.listen_unix(root / wire.LOCAL_SOCKET)
    try:
        yield server, store
    finally:
        await server.close()
        store.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 60))


@in_c
def test_plain_writes_are_served_in_c_and_read_back(tmp_path: Path) -> None:
    async def body() -> None:
        async with disk_server(tmp_path) as (server, _store):
            client = DataClient(server.address)
            await client.connect()
            try:
                v = uuid.uuid4().hex
                await client.create(v, 8 * MIB)
                blocks = {k: os.urandom(BLOCK_SIZE) for k in range(0, 2048, 7)}
                replies = [client.start_write(v, 1, k * BLOCK_SIZE, data, 5 + k % 3)
                           for k, data in blocks.items()]
                await asyncio.gather(*replies)
                assert served(server) >= len(blocks) - 4  # the first writes of a page: Python
                for k, data in blocks.items():
                    assert bytes(await client.read(v, 1, k * BLOCK_SIZE, BLOCK_SIZE)) == data
                # reads of what the page cache holds, pipelined: in C too
                reads = server.compiled()[1]
                assert reads >= len(blocks) - 2
                got = await asyncio.gather(*(client.start_read(v, 1, k * 2 * BLOCK_SIZE,
                                                               2 * BLOCK_SIZE)
                                             for k in range(1024)))
                assert server.compiled()[1] >= reads + 1000
                for k, data in blocks.items():
                    pair = got[k // 2]
                    assert pair[k % 2 * BLOCK_SIZE:(k % 2 + 1) * BLOCK_SIZE] == data
                    if k ^ 1 not in blocks:  # never written: zeros
                        assert pair[(k ^ 1) % 2 * BLOCK_SIZE:][:BLOCK_SIZE] == bytes(BLOCK_SIZE)
                gens = await client.generations(v)
                for k in blocks:
                    chunk = k * BLOCK_SIZE // CHUNK_SIZE
                    want = max(5 + j % 3 for j in blocks if j * BLOCK_SIZE // CHUNK_SIZE == chunk)
                    assert int.from_bytes(gens[chunk * 8:chunk * 8 + 8], "little") == want
            finally:
                await client.close()

    run(body)


@in_c
def test_shared_writes_over_the_unix_socket_are_served_in_c(tmp_path: Path) -> None:
    async def body() -> None:
        async with disk_server(tmp_path) as (server, _store):
            shared = SharedMemory(MIB, slots=4)
            client = DataClient(server.address, local_socket=str(tmp_path / wire.LOCAL_SOCKET),
                                shared=shared)
            await client.connect()
            try:
                assert client._sharing
                v = uuid.uuid4().hex
                await client.create(v, 16 * MIB)
                written = {}
                for round_ in range(3):
                    replies = []
                    for k in range(4):
                        slot = shared.take()
                        assert slot is not None
                        data = os.urandom(MIB if k % 2 else 4 * BLOCK_SIZE)
                        shared.slot(slot)[:len(data)] = data
                        offset = (round_ * 4 + k) * MIB
                        replies.append((slot, client.start_write(
                            v, 1, offset, shared.slot(slot)[:len(data)], 1,
                            slot * shared.slot_size)))
                        written[offset] = data
                    for slot, reply in replies:
                        await reply
                        shared.release(slot)
                assert served(server) >= 8
                for offset, data in written.items():
                    assert bytes(await client.read(v, 1, offset, len(data))) == data
            finally:
                await client.close()
                shared.close()

    run(body)


@in_c
def test_a_fenced_epoch_is_refused_on_the_compiled_path(tmp_path: Path) -> None:
    async def body() -> None:
        async with disk_server(tmp_path) as (server, _store):
            old, new = DataClient(server.address), DataClient(server.address)
            await old.connect()
            await new.connect()
            try:
                v = uuid.uuid4().hex
                await old.create(v, 4 * MIB)
                for k in range(20):
                    await old.write(v, 1, k * BLOCK_SIZE, b"o" * BLOCK_SIZE, 1)
                before = served(server)
                assert before >= 18
                await new.fence(v, 2)
                with pytest.raises(Fenced):
                    await old.write(v, 1, 0, b"x" * BLOCK_SIZE, 2)
                assert served(server) == before
                assert bytes(await new.read(v, 2, 0, BLOCK_SIZE)) == b"o" * BLOCK_SIZE
                await new.write(v, 2, 0, b"n" * BLOCK_SIZE, 3)
                await new.write(v, 2, BLOCK_SIZE, b"n" * BLOCK_SIZE, 3)
                # the new epoch, in C: the read at it (in Python) allowed it on `new`
                assert served(server) == before + 2
                assert bytes(await old.read(v, 2, 0, 2 * BLOCK_SIZE)) == b"n" * 2 * BLOCK_SIZE
            finally:
                await old.close()
                await new.close()

    run(body)


@in_c
def test_snapshots_grow_and_delete_leave_the_compiled_path(tmp_path: Path) -> None:
    async def body() -> None:
        async with disk_server(tmp_path) as (server, _store):
            client = DataClient(server.address)
            await client.connect()
            try:
                v = uuid.uuid4().hex
                await client.create(v, 4 * MIB)
                for k in range(8):
                    await client.write(v, 1, k * BLOCK_SIZE, b"a" * BLOCK_SIZE, 1)
                # grow: new maps, a new writer; the old one refuses, Python takes over
                await client.resize(v, 8 * MIB)
                for k in range(8):
                    await client.write(v, 1, 6 * MIB + k * BLOCK_SIZE, b"g" * BLOCK_SIZE, 2)
                assert bytes(await client.read(v, 1, 6 * MIB, BLOCK_SIZE)) == b"g" * BLOCK_SIZE
                fast = served(server)
                assert fast >= 12
                # a snapshot: from now on the version map places every write
                await client.snapshot(v, 1, "e" * 32, 1.0)
                for k in range(8):
                    await client.write(v, 1, k * BLOCK_SIZE, b"b" * BLOCK_SIZE, 3)
                assert served(server) == fast
                assert bytes(await client.read_snapshot(v, 1, "e" * 32, 0, BLOCK_SIZE)) == \
                    b"a" * BLOCK_SIZE
                reads = server.compiled()[1]
                for _ in range(3):
                    assert bytes(await client.read(v, 1, 0, BLOCK_SIZE)) == b"b" * BLOCK_SIZE
                assert server.compiled()[1] == reads  # the version map places reads too
                # a deleted replica answers as gone, not from a writer left behind
                w = uuid.uuid4().hex
                await client.create(w, MIB)
                for k in range(4):
                    await client.write(w, 1, k * BLOCK_SIZE, b"d" * BLOCK_SIZE, 1)
                await client.delete(w)
                with pytest.raises(ReplicaNotFound):
                    await client.write(w, 1, 0, b"d" * BLOCK_SIZE, 1)
            finally:
                await client.close()

    run(body)


@in_c
def test_a_block_that_does_not_match_its_checksum_is_answered_in_python(tmp_path: Path) -> None:
    async def body() -> None:
        async with disk_server(tmp_path) as (server, _store):
            client = DataClient(server.address)
            await client.connect()
            try:
                v = uuid.uuid4().hex
                await client.create(v, MIB)
                for k in range(8):
                    await client.write(v, 1, k * BLOCK_SIZE, bytes([k + 1]) * BLOCK_SIZE, 1)
                fd = os.open(tmp_path / "replicas" / v / "data", os.O_WRONLY)
                try:
                    os.pwrite(fd, b"!", 5 * BLOCK_SIZE + 9)  # behind the server's back
                finally:
                    os.close(fd)
                before = server.compiled()[1]
                got = await asyncio.gather(*(client.start_read(v, 1, k * BLOCK_SIZE, BLOCK_SIZE)
                                             for k in range(8)), return_exceptions=True)
                assert isinstance(got[5], ChecksumMismatch)
                assert got[5].fields["offset"] == 5 * BLOCK_SIZE
                assert [g for k, g in enumerate(got) if k != 5] == \
                    [bytes([k + 1]) * BLOCK_SIZE for k in range(8) if k != 5]
                assert server.compiled()[1] - before >= 6  # the others: in C
            finally:
                await client.close()

    run(body)


async def scenario(address: str, seed: int) -> list[Any]:
    """Pipelined requests of one connection: writes and reads of many shapes, trims, fences,
    writes and reads at stale epochs and out of range; the answers, in order."""
    rng = random.Random(seed)
    client = DataClient(address)
    await client.connect()
    answers: list[Any] = []
    try:
        v = "5" * 32
        await client.create(v, 4 * MIB)
        epoch = 1
        for _ in range(12):
            pending: list[Awaitable[Any]] = []
            # A read that waits for the disk is done in a thread while the requests after it
            # run, with or without C: in one batch, reads and changes keep to their own halves.
            half = rng.randrange(2) * 2 * MIB
            for _ in range(rng.randrange(1, 40)):
                kind = rng.random()
                offset = rng.randrange(4 * MIB // BLOCK_SIZE + 1) * BLOCK_SIZE
                if 0.09 <= kind < 0.3:  # reads, some stale, some out of range or too big for C
                    length = rng.choice([BLOCK_SIZE] * 4 + [2 * BLOCK_SIZE, 70 * BLOCK_SIZE])
                    offset = half + offset % (2 * MIB - length + BLOCK_SIZE) // BLOCK_SIZE * \
                        BLOCK_SIZE
                    if rng.random() < 0.05:
                        offset = 4 * MIB  # out of range
                    stale = epoch - 1 if kind < 0.11 and epoch > 1 else epoch
                    pending.append(client.start_read(v, stale, offset, length))
                    continue
                # the other half; in the upper one some run past the end (refused)
                offset = offset % (2 * MIB) if half else 2 * MIB + offset % (2 * MIB)
                if half:
                    offset = offset % (2 * MIB - 70 * BLOCK_SIZE)
                if kind < 0.06:
                    pending.append(client.trim(v, epoch, offset, BLOCK_SIZE * rng.randrange(1, 9),
                                               rng.randrange(1, 50)))
                elif kind < 0.09:
                    epoch += 1
                    pending.append(client.fence(v, epoch))
                else:
                    length = rng.choice([BLOCK_SIZE] * 6 + [3 * BLOCK_SIZE, 40000, 70 * BLOCK_SIZE])
                    stale = epoch - 1 if kind < 0.12 and epoch > 1 else epoch
                    pending.append(client.start_write(v, stale, offset, rng.randbytes(length),
                                                      rng.randrange(0, 60)))
            for result in await asyncio.gather(*pending, return_exceptions=True):
                answers.append(type(result).__name__ if isinstance(result, CargoholdError)
                               else bytes(result) if isinstance(result, memoryview)
                               else result)
        answers.append(await client.generations(v))
        answers.append(bytes(await client.read(v, epoch, 0, 4 * MIB)))
    finally:
        await client.close()
    return answers


@pytest.mark.parametrize("seed", range(3))
def test_the_same_requests_give_the_same_answers_and_files_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    async def both() -> list[tuple[list[Any], dict[str, bytes], tuple[int, int]]]:
        results = []
        for way in ("1", "0"):
            monkeypatch.setenv(compiled.VARIABLE, way)
            async with disk_server(tmp_path / way) as (server, store):
                answers = await scenario(server.address, seed)
                count = server.compiled()
                store.close()  # maps written back before the files are read
                replica = tmp_path / way / "replicas" / ("5" * 32)
                files = {name: (replica / name).read_bytes() for name in ("data", "sums", "gens")}
            results.append((answers, files, count))
        return results

    (fast_answers, fast_files, fast_count), (slow_answers, slow_files, slow_count) = \
        asyncio.run(asyncio.wait_for(both(), 120))
    assert slow_count == (0, 0) and fast_count[0] > 50 and fast_count[1] > 10
    assert fast_answers == slow_answers
    assert "Fenced" in fast_answers or "InvalidArgument" in fast_answers
    for name in fast_files:
        assert fast_files[name] == slow_files[name], name
