"""The data server's plain writes served in C (adapters/dataserver/fastwrites.py), in a real
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

from cargohold.adapters.dataserver import DataProtocolServer, fastwrites, serve
from cargohold.clients.dataclient import DataClient
from cargohold.clients.sharedmemory import SharedMemory
from cargohold.core import compiled, wire
from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE
from cargohold.errors import CargoholdError, Fenced, ReplicaNotFound
from cargohold.stores.diskstore import DiskChunkStore

pytestmark = pytest.mark.skipif(not fastwrites.built(), reason="the C was not built")
in_c = pytest.mark.skipif(not compiled.wanted(), reason=f"{compiled.VARIABLE}=0")
MIB = 1 << 20


def served(server: DataProtocolServer) -> int:
    return server.compiled_writes()


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
                assert served(server) == before + 1  # the second: the new epoch, in C
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
                assert bytes(await client.read(v, 1, 0, BLOCK_SIZE)) == b"b" * BLOCK_SIZE
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


async def scenario(address: str, seed: int) -> list[Any]:
    """Pipelined requests of one connection: writes of many shapes, trims, fences, writes
    at stale epochs and out of range; the answers, in order."""
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
            for _ in range(rng.randrange(1, 40)):
                kind = rng.random()
                offset = rng.randrange(4 * MIB // BLOCK_SIZE + 1) * BLOCK_SIZE
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
                               else result)
        answers.append(await client.generations(v))
        answers.append(bytes(await client.read(v, epoch, 0, 4 * MIB)))
    finally:
        await client.close()
    return answers


@pytest.mark.parametrize("seed", range(3))
def test_the_same_requests_give_the_same_answers_and_files_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    async def both() -> list[tuple[list[Any], dict[str, bytes], int]]:
        results = []
        for way in ("1", "0"):
            monkeypatch.setenv(compiled.VARIABLE, way)
            async with disk_server(tmp_path / way) as (server, store):
                answers = await scenario(server.address, seed)
                count = served(server)
                store.close()  # maps written back before the files are read
                replica = tmp_path / way / "replicas" / ("5" * 32)
                files = {name: (replica / name).read_bytes() for name in ("data", "sums", "gens")}
            results.append((answers, files, count))
        return results

    (fast_answers, fast_files, fast_count), (slow_answers, slow_files, slow_count) = \
        asyncio.run(asyncio.wait_for(both(), 120))
    assert slow_count == 0 and fast_count > 50
    assert fast_answers == slow_answers
    assert "Fenced" in fast_answers or "InvalidArgument" in fast_answers
    for name in fast_files:
        assert fast_files[name] == slow_files[name], name
