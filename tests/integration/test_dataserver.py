"""The data server as a real process on 127.0.0.1, driven through DataClient."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cargohold.adapters import dataserver
from cargohold.adapters.dataserver import serve
from cargohold.clients import dataclient
from cargohold.clients.dataclient import DataClient
from cargohold.clients.sharedmemory import SharedMemory
from cargohold.clients.sockets import SEND_BUFFER
from cargohold.core import chunkdelta, wire
from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE
from cargohold.errors import (
    CargoholdError,
    ChecksumMismatch,
    DataServerUnavailable,
    Fenced,
    InvalidArgument,
    ReplicaNotFound,
)
from cargohold.stores.chunkstore import MemoryChunkStore
from cargohold.stores.diskstore import DiskChunkStore
from tests.pagecache import PAGE, cached

SRC = Path(__file__).resolve().parents[2] / "src"
MIB = 1 << 20
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class ServerProcess:
    """``python -m cargohold.daemons.dataserver`` in a directory, restartable."""

    def __init__(self, base: Path, extra: tuple[str, ...] = ()) -> None:
        self.extra = extra  # command line options (default: plaintext, no capabilities)
        self.root = base / "disk"
        self.ready_file = base / "ready.json"
        self.log = base / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    @property
    def address(self) -> str:
        return str(self.info["address"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> dict[str, Any]:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cargohold.daemons.dataserver",
                    "--dir",
                    str(self.root),
                    "--listen",
                    "127.0.0.1:0",
                    "--ready-file",
                    str(self.ready_file),
                    "--log-level",
                    "DEBUG",
                    *(self.extra or ("--insecure-plaintext",)),  # the protocol's mechanics
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"data server exited with {self.proc.returncode}")
            try:
                info = json.loads(self.ready_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                info = {}
            if info.get("pid") == self.proc.pid:
                self.info = info
                return info
            time.sleep(0.02)
        raise AssertionError(f"data server not ready within {timeout} s")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path)
    try:
        process.start()
        yield process
    finally:
        if process.proc is not None and process.proc.poll() is None:
            process.signal(signal.SIGCONT)
        process.kill()
        if process.log.exists():  # shown by pytest when the test fails
            print(process.log.read_text(errors="replace")[-20_000:])


def with_client(server: ServerProcess, body: Callable[[DataClient], Awaitable[T]]) -> T:
    async def main() -> T:
        client = DataClient(server.address)
        await client.connect()
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(main())


def vid() -> str:
    return uuid.uuid4().hex


def test_hello_create_stat_delete(server: ServerProcess) -> None:
    async def body(c: DataClient) -> None:
        info = await c.hello()
        assert info["id"] == server.info["id"] == c.server_id
        assert info["version"] == wire.VERSION
        v = vid()
        await c.create(v, 64 * MIB)
        await c.create(v, 64 * MIB)  # idempotent
        with pytest.raises(InvalidArgument, match="size"):
            await c.create(v, 32 * MIB)
        stat = await c.stat(v)
        assert stat == {
            "volume_id": v,
            "size": 64 * MIB,
            "used": 0,
            "epoch": 0,
            "chunks_written": 0,
        }
        assert v in (await c.hello())["replicas"]
        await c.delete(v)
        await c.delete(v)
        with pytest.raises(ReplicaNotFound):
            await c.stat(v)
        with pytest.raises(ReplicaNotFound):
            await c.read(v, 1, 0, BLOCK_SIZE)

    with_client(server, body)


def test_pipelined_small_writes_then_reads(server: ServerProcess) -> None:
    async def body(c: DataClient) -> None:
        v = vid()
        await c.create(v, 64 * MIB)
        rng = random.Random(7)
        offsets = rng.sample(range(64 * MIB // BLOCK_SIZE), 200)
        blocks = {o * BLOCK_SIZE: rng.randbytes(BLOCK_SIZE) for o in offsets}
        await asyncio.gather(*(c.write(v, 1, o, d, 1) for o, d in blocks.items()))
        got = await asyncio.gather(*(c.read(v, 1, o, BLOCK_SIZE) for o in blocks))
        assert got == list(blocks.values())
        assert (await c.stat(v))["used"] >= 200 * BLOCK_SIZE

    with_client(server, body)


def test_large_writes_across_chunks_and_flush(server: ServerProcess) -> None:
    async def body(c: DataClient) -> None:
        v = vid()
        await c.create(v, 16 * MIB)
        data = {k * MIB + MIB // 2: os.urandom(MIB) for k in range(8)}
        await asyncio.gather(
            *(c.write(v, 2, o, d, 10 + i) for i, (o, d) in enumerate(data.items()))
        )
        await c.flush(v, 2)
        got = await asyncio.gather(*(c.read(v, 2, o, MIB) for o in data))
        assert got == list(data.values())
        gens = struct.unpack("<16Q", await c.generations(v))
        assert gens[:10] == (10, 11, 12, 13, 14, 15, 16, 17, 17, 0)
        await c.trim(v, 2, MIB, MIB, generation=20)
        assert await c.read(v, 2, MIB, MIB) == bytes(MIB)
        assert struct.unpack("<16Q", await c.generations(v))[1] == 20

    with_client(server, body)


def test_a_copying_connection_keeps_the_page_cache_small(server: ServerProcess) -> None:
    """A bulk copy's connection (HELLO "copying") has its writes written back and dropped
    from the page cache 32 MiB behind it; an engine's writes stay cached."""
    copy, plain, size = vid(), vid(), 48 * MIB
    data = os.urandom(MIB)

    async def main() -> None:
        async with DataClient(server.address, copying=True) as copier, \
                DataClient(server.address) as writer:
            for c, v in ((copier, copy), (writer, plain)):
                await c.create(v, size)
                for at in range(0, size, 4 * MIB):
                    await asyncio.gather(*(c.write(v, 1, o, data, 1)
                                           for o in range(at, at + 4 * MIB, MIB)))
            for c, v in ((copier, copy), (writer, plain)):  # a read brings data back
                assert await c.read(v, 1, 7 * MIB, MIB) == data

    asyncio.run(main())
    pages = size // PAGE
    copied = cached(server.root / "replicas" / copy / "data", pages)
    written = cached(server.root / "replicas" / plain / "data", pages)
    assert not any(copied[: 6 * MIB // PAGE]) and all(copied[7 * MIB // PAGE : 8 * MIB // PAGE])
    assert all(copied[-MIB // PAGE :]) and all(written)


def test_local_unix_socket_and_future_api(server: ServerProcess) -> None:
    """Same frames over the server's unix socket; start_read/start_write are plain futures."""
    sock = server.root / wire.LOCAL_SOCKET
    assert sock.is_socket()

    async def main() -> None:
        c = DataClient(server.address, local_socket=str(sock))
        await c.connect()
        try:
            assert c._protocol is not None and c._protocol.transport is not None
            transport = c._protocol.transport
            assert transport.get_extra_info("peername") == str(sock)
            # a 1 MiB frame fits in the socket at once (the kernel doubles what is asked)
            sent = transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET,
                                                                socket.SO_SNDBUF)
            assert sent >= SEND_BUFFER
            v = vid()
            await c.create(v, 16 * MIB)
            big, small = os.urandom(MIB), os.urandom(BLOCK_SIZE)
            writes = [c.start_write(v, 1, 0, big, 1), c.start_write(v, 1, 2 * MIB, small, 2)]
            assert all(isinstance(w, asyncio.Future) for w in writes)
            await asyncio.gather(*writes)
            got_big, got_small = await asyncio.gather(c.start_read(v, 1, 0, MIB),
                                                      c.start_read(v, 1, 2 * MIB, BLOCK_SIZE))
            assert bytes(got_big) == big and got_small == small
            assert isinstance(got_small, bytes)  # copied out of the reader's buffer
            await c.fence(v, 5)
            with pytest.raises(Fenced):
                await c.start_write(v, 1, 0, small, 3)
        finally:
            await c.close()
        missing = DataClient(server.address, local_socket=str(server.root / "nope.sock"))
        await missing.connect()  # no such socket: TCP
        assert (await missing.hello())["id"] == server.info["id"]
        await missing.close()

    asyncio.run(main())
    assert server.stop() == 0
    assert not sock.exists()  # a stopping server removes its socket


def test_shared_write_buffers_over_the_unix_socket(server: ServerProcess, tmp_path: Path) -> None:
    """A local client's large writes name a place in its shared memory instead of carrying
    the bytes; slots come back once the server answered; TCP and bad positions are refused."""
    sock = server.root / wire.LOCAL_SOCKET

    async def main() -> None:
        shared = SharedMemory(2 * MIB, slots=3)
        c = DataClient(server.address, local_socket=str(sock), shared=shared)
        tcp = DataClient(server.address, shared=shared)  # no unix socket: never shared
        try:
            await c.connect()
            await tcp.connect()
            assert c._sharing and not tcp._sharing
            v = vid()
            await c.create(v, 16 * MIB)
            slot = shared.take()
            assert slot == 0 and shared.free == 2
            data = os.urandom(MIB)
            shared.slot(slot)[4096:4096 + MIB] = data
            at = slot * shared.slot_size + 4096
            reply = c.start_write(v, 1, 3 * MIB, shared.slot(slot)[4096:4096 + MIB], 7, at)
            assert shared._holds[slot] == 2  # the caller's and the client's
            await reply
            assert shared._holds[slot] == 1  # the server answered: the client let go
            shared.release(slot)
            assert shared.free == 3
            assert bytes(await c.read(v, 1, 3 * MIB, MIB)) == data
            assert (await c.generations(v))[3 * MIB // CHUNK_SIZE * 8:][:8] != bytes(8)
            # over TCP the same call carries the bytes (WRITE)
            await tcp.start_write(v, 1, 5 * MIB, data, 8, at)
            assert bytes(await tcp.read(v, 1, 5 * MIB, MIB)) == data
            # the server checks the position against what it mapped
            with pytest.raises(InvalidArgument, match="exceed"):
                await c._call(wire.Op.WRITE_SHARED, v, epoch=1, offset=0, length=MIB,
                              generation=9, payload=wire.encode_u64(shared.size - 4096))
            offer = {"path": shared.path, "token": shared.token.hex()}
            with pytest.raises(InvalidArgument, match="unix socket"):
                await tcp._call(wire.Op.SHARE, "", payload=wire.encode_json(offer))
            # a path to some other file (another PID namespace's process) is refused
            other = DataClient(server.address, local_socket=str(sock))
            await other.connect()
            try:
                with pytest.raises(InvalidArgument, match="not the client's file"):
                    await other._call(wire.Op.SHARE, "", payload=wire.encode_json(
                        {**offer, "token": os.urandom(16).hex()}))
                with pytest.raises(InvalidArgument, match="no such file|No such file"):
                    await other._call(wire.Op.SHARE, "", payload=wire.encode_json(
                        {**offer, "path": f"/proc/{os.getpid()}/fd/999999"}))
                # only a file the connecting process holds: not one it names ...
                with pytest.raises(InvalidArgument, match="not a file of the connecting"):
                    await other._call(wire.Op.SHARE, "", payload=wire.encode_json(
                        {**offer, "path": "/proc/self/fd/0"}))  # the server's own
                named = tmp_path / "named"
                named.write_bytes(bytes(4096) + shared.token)  # ends with the token, too
                with pytest.raises(InvalidArgument, match="not a file of the connecting"):
                    await other._call(wire.Op.SHARE, "", payload=wire.encode_json(
                        {**offer, "path": str(named)}))
                # ... and one that cannot shrink under the server's mapping
                loose = os.memfd_create("loose")
                try:
                    os.write(loose, bytes(4096) + shared.token)
                    with pytest.raises(InvalidArgument, match="not sealed against shrinking"):
                        await other._call(wire.Op.SHARE, "", payload=wire.encode_json(
                            {**offer, "path": f"/proc/{os.getpid()}/fd/{loose}"}))
                finally:
                    os.close(loose)
                with pytest.raises(PermissionError):  # the engine's own file cannot shrink
                    os.ftruncate(shared.fd, 4096)
                with pytest.raises(InvalidArgument, match="no buffers shared"):
                    await other._call(wire.Op.WRITE_SHARED, v, epoch=1, offset=0, length=MIB,
                                      generation=9, payload=wire.encode_u64(0))
            finally:
                await other.close()
            with pytest.raises(InvalidArgument, match="no buffers shared"):
                await tcp._call(wire.Op.WRITE_SHARED, v, epoch=1, offset=0, length=MIB,
                                generation=9, payload=wire.encode_u64(0))
            assert bytes(await c.read(v, 1, 0, MIB)) == bytes(MIB)  # nothing written
            # a connection that fails before the answer keeps its slot from being reused
            slot = shared.take()
            assert slot is not None
            server.signal(signal.SIGSTOP)
            try:
                pending = c.start_write(v, 1, 0, shared.slot(slot)[:MIB], 10,
                                        slot * shared.slot_size)
                await asyncio.sleep(0.1)
                await c.close()
                with pytest.raises(DataServerUnavailable):
                    await pending
            finally:
                server.signal(signal.SIGCONT)
            shared.release(slot)
            assert shared.free == 2 and shared._holds[slot] == 1
        finally:
            await c.close()
            await tcp.close()
            shared.close()

    asyncio.run(main())


def test_fencing(server: ServerProcess) -> None:
    async def body(c: DataClient) -> None:
        v = vid()
        await c.create(v, 4 * MIB)
        await c.fence(v, 5)
        with pytest.raises(Fenced) as caught:
            await c.write(v, 3, 0, b"x" * BLOCK_SIZE, 1)
        assert caught.value.fields == {"volume_id": v, "epoch": 3, "current": 5}
        with pytest.raises(Fenced):
            await c.read(v, 4, 0, BLOCK_SIZE)
        with pytest.raises(Fenced):
            await c.fence(v, 4)
        await c.write(v, 7, 0, b"y" * BLOCK_SIZE, 1)  # a newer epoch is taken on the way
        assert (await c.stat(v))["epoch"] == 7
        with pytest.raises(Fenced):
            await c.flush(v, 5)
        with pytest.raises(InvalidArgument, match="epoch"):
            await c.write(v, 0, 0, b"z" * BLOCK_SIZE, 1)
        assert await c.read(v, 7, 0, BLOCK_SIZE) == b"y" * BLOCK_SIZE

    with_client(server, body)


def test_errors_come_back_as_error_classes(server: ServerProcess) -> None:
    v = vid()

    async def body(c: DataClient) -> None:
        await c.create(v, 4 * MIB)
        with pytest.raises(InvalidArgument, match="multiples"):
            await c.read(v, 1, 100, BLOCK_SIZE)
        with pytest.raises(InvalidArgument, match="beyond"):
            await c.write(v, 1, 4 * MIB, b"x" * BLOCK_SIZE, 1)
        await c.write(v, 1, CHUNK_SIZE, os.urandom(8 * BLOCK_SIZE), 1)
        with open(server.root / "replicas" / v / "data", "r+b") as f:
            f.seek(CHUNK_SIZE + 3 * BLOCK_SIZE + 1)
            f.write(b"\xff\x00")
        with pytest.raises(ChecksumMismatch) as caught:
            await c.read(v, 1, CHUNK_SIZE, 8 * BLOCK_SIZE)
        assert caught.value.fields["offset"] == CHUNK_SIZE + 3 * BLOCK_SIZE
        assert len(await c.read(v, 1, CHUNK_SIZE, 3 * BLOCK_SIZE)) == 3 * BLOCK_SIZE

    with_client(server, body)


def test_kill_9_fails_pending_and_later_calls_and_restart_keeps_the_port(
    server: ServerProcess,
) -> None:
    v = vid()
    data = os.urandom(MIB)

    async def before(c: DataClient) -> None:
        await c.create(v, 8 * MIB)
        await c.write(v, 3, 0, data, 1)
        await c.flush(v, 3)
        server.signal(signal.SIGSTOP)  # requests now stay pending
        pending = [asyncio.ensure_future(c.read(v, 3, 0, BLOCK_SIZE)) for _ in range(50)]
        await asyncio.sleep(0.2)
        assert not any(p.done() for p in pending)
        server.kill()
        started = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*pending, return_exceptions=True), timeout=5
        )
        assert time.monotonic() - started < 2
        assert all(isinstance(r, DataServerUnavailable) for r in results), results
        with pytest.raises(DataServerUnavailable):
            await c.read(v, 3, 0, BLOCK_SIZE)
        assert not c.connected

    with_client(server, before)
    address = server.address
    server.start()
    assert server.address == address

    async def after(c: DataClient) -> None:
        assert await c.read(v, 3, 0, MIB) == data
        assert (await c.stat(v))["epoch"] == 3

    with_client(server, after)


def test_call_timeout(server: ServerProcess) -> None:
    async def body(c: DataClient) -> None:
        await c.hello()
        server.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(DataServerUnavailable, match="within"):
                await c.hello(timeout=0.3)
            assert time.monotonic() - started < 2
        finally:
            server.signal(signal.SIGCONT)
        assert (await c.hello(timeout=5))["id"] == server.info["id"]  # the late answer is ignored

    with_client(server, body)


def test_graceful_stop_keeps_data(server: ServerProcess) -> None:
    v = vid()

    async def before(c: DataClient) -> None:
        await c.create(v, 4 * MIB)
        await c.write(v, 1, 0, b"k" * BLOCK_SIZE, 1)

    with_client(server, before)
    assert server.stop() == 0
    server.start()

    async def after(c: DataClient) -> None:
        assert await c.read(v, 1, 0, BLOCK_SIZE) == b"k" * BLOCK_SIZE

    with_client(server, after)


def test_connect_failure_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def body() -> None:
        client = DataClient(f"127.0.0.1:{port}")
        with pytest.raises(DataServerUnavailable):
            await client.hello()
        with pytest.raises(DataServerUnavailable, match="connect"):
            await client.connect(timeout=1)
        await client.close()

    run(body())


def test_bad_frame_closes_only_that_connection() -> None:
    async def body() -> None:
        store = MemoryChunkStore()
        server = await serve(store, "127.0.0.1", 0)
        client = DataClient(server.address)
        try:
            await client.connect()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()
            await writer.wait_closed()
            assert (await client.hello())["id"] == store.server_id
        finally:
            await client.close()
            await server.close()

    run(body())


@pytest.mark.parametrize("chunks", [7, 6, 2])
def test_generations_come_in_pages(monkeypatch: pytest.MonkeyPatch, chunks: int) -> None:
    monkeypatch.setattr(dataclient, "_GENS_PAGE", 3)

    async def body() -> None:
        store = MemoryChunkStore()
        server = await serve(store, "127.0.0.1", 0)
        client = DataClient(server.address)
        try:
            await client.connect()
            v = vid()
            await client.create(v, chunks * CHUNK_SIZE)
            for chunk in range(chunks):
                await client.write(v, 1, chunk * CHUNK_SIZE, b"p" * BLOCK_SIZE, chunk + 1)
            raw = await client.generations(v)
            assert struct.unpack(f"<{chunks}Q", raw) == tuple(range(1, chunks + 1))
        finally:
            await client.close()
            await server.close()

    run(body())


def test_protocol_level_refusals() -> None:
    async def body() -> None:
        store = MemoryChunkStore()
        server = await serve(store, "127.0.0.1", 0)
        client = DataClient(server.address)
        try:
            await client.connect()
            v = vid()
            await client.create(v, MIB)
            for op in (
                client.read(v, 0, 0, BLOCK_SIZE),
                client.flush(v, 0),
                client.trim(v, 0, 0, BLOCK_SIZE),
                client.fence(v, 0),
            ):
                with pytest.raises(InvalidArgument, match="epoch"):
                    await op
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(wire.REQUEST_HEADER.pack(b"CH", 1, 99, 5, bytes(16), 0, 0, 0, 0, 0))
            header, payload = wire.decode_response(
                await asyncio.wait_for(reader.readexactly(wire.RESPONSE_HEADER.size + 17), 5)
            )
            assert (header.status, header.request_id) == (wire.Status.INVALID, 5)
            assert payload == b"op: unknown op 99"
            writer.close()
            await writer.wait_closed()
            with pytest.raises(CargoholdError):
                await client.create(v, 2 * MIB)
        finally:
            await client.close()
            await server.close()

    run(body())


def test_written_replicas_start_their_writeback(tmp_path: Path) -> None:
    """The server's timer starts writeback of replicas written since its last turn."""

    async def run() -> None:
        store = DiskChunkStore(tmp_path)
        server = await serve(store, "127.0.0.1", 0)
        client = DataClient(server.address, store.server_id)
        try:
            await client.connect()
            volume = uuid.uuid4().hex
            await client.create(volume, 4 * MIB)
            await client.write(volume, 1, 0, b"w" * BLOCK_SIZE, 1)
            [replica] = store.open_replicas()
            await asyncio.sleep(dataserver.WRITEBACK_INTERVAL * 1.5)
            assert replica.small_writes == 1  # too few to bother
            for k in range(dataserver.WRITEBACK_AFTER):
                await client.write(volume, 1, (k % 256) * BLOCK_SIZE, b"w" * BLOCK_SIZE, 1)
            deadline = time.monotonic() + 3 * dataserver.WRITEBACK_INTERVAL
            while replica.small_writes and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert replica.small_writes == 0
        finally:
            await client.close()
            await server.close()
            store.close()

    asyncio.run(run())


# --- what one client can make a data server hold --------------------------------------------


def _raw(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _closed(sock: socket.socket, within: float) -> bool:
    """Whether the server closed ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_connection_past_the_cap_is_closed_and_the_others_served(tmp_path: Path) -> None:
    process = ServerProcess(tmp_path, ("--max-connections", "4", "--insecure-plaintext"))
    try:
        process.start()

        async def main() -> None:
            clients = [DataClient(process.address) for _ in range(4)]
            for c in clients:
                await c.connect()
                await c.hello()
            extra = DataClient(process.address)
            await extra.connect()  # accepted by the kernel, closed by the server at once
            with pytest.raises(DataServerUnavailable):
                await extra.hello()
            await extra.close()
            await clients[0].close()
            await asyncio.sleep(0.2)
            again = DataClient(process.address)
            await again.connect()
            assert "id" in await again.hello()
            for c in [again, *clients[1:]]:
                assert "id" in await c.hello()
                await c.close()

        asyncio.run(main())
    finally:
        process.kill()


def test_half_a_frame_held_past_the_timeout_closes_the_connection(tmp_path: Path) -> None:
    process = ServerProcess(tmp_path, ("--frame-timeout", "0.5", "--insecure-plaintext"))
    try:
        process.start()
        header = wire.encode_request_header(wire.Op.WRITE, 1, vid(), epoch=1, length=MIB,
                                            generation=1, payload_length=MIB)
        with _raw(process.address) as idle, _raw(process.address) as half_header, \
                _raw(process.address) as half_payload:
            half_header.sendall(header[:10])
            half_payload.sendall(header + bytes(4096))
            assert _closed(half_header, 3.0) and _closed(half_payload, 3.0)
            assert not _closed(idle, 1.5)  # a connection at a frame boundary may idle
            idle.sendall(wire.encode_request_header(wire.Op.HELLO, 2))
            idle.settimeout(5)
            assert len(idle.recv(65536)) > 0  # and is still served
    finally:
        process.kill()


def test_reads_a_client_never_collects_are_refused_past_the_bound(server: ServerProcess) -> None:
    v = vid()

    async def setup() -> None:
        async with DataClient(server.address) as c:
            await c.create(v, 64 * MIB)
            await c.fence(v, 1)

    asyncio.run(setup())
    asks = 24  # 24 x 16 MiB = 384 MiB of answers, none read until all were asked
    with _raw(server.address) as sock:
        sock.sendall(b"".join(
            wire.encode_request_header(wire.Op.READ, i + 1, v, epoch=1, offset=0,
                                       length=wire.MAX_PAYLOAD) for i in range(asks)))
        time.sleep(1.0)
        reader = wire.response_reader()
        statuses: list[int] = []
        sock.settimeout(10)
        while len(statuses) < asks:
            buffer = reader.get_buffer()
            n = sock.recv_into(buffer)
            assert n, "the server closed the connection"
            statuses += [h.status for h, _ in reader.feed(n)]
    ok = statuses.count(wire.Status.OK)
    assert 1 <= ok <= 10 and len(statuses) == asks  # 128 MiB of answers, and a socket's worth
    assert server.proc is not None and server.proc.poll() is None


def test_a_chunks_scattered_blocks_in_one_write_and_the_blocks_a_snapshot_differs_by(
        server: ServerProcess) -> None:
    async def body(c: DataClient) -> None:
        v = vid()
        await c.create(v, 8 * MIB)
        base = os.urandom(MIB)
        await c.write(v, 1, 2 * MIB, base, 1)
        first = uuid.uuid4().hex
        await c.snapshot(v, 1, first, 1.0)
        blocks = [0, 1, 2, 9, 200, 255]
        data = os.urandom(len(blocks) * BLOCK_SIZE)
        await c.write_blocks(v, 1, 2 * MIB, chunkdelta.encode(blocks, data), 2)
        want = bytearray(base)
        for k, block in enumerate(blocks):
            want[block * BLOCK_SIZE:(block + 1) * BLOCK_SIZE] = \
                data[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]
        assert await c.read(v, 1, 2 * MIB, MIB) == bytes(want)
        # exactly those blocks differ from the snapshot; in chunks, just the one
        per_chunk = MIB // BLOCK_SIZE
        assert await c.snapshot_diff(v, first, "", blocks=True) == \
            [2 * per_chunk + b for b in blocks]
        assert await c.snapshot_diff(v, first, "") == [2]
        # the same blocks (and one of chunk 3) read back from a snapshot in one request, as
        # a batch of delta records
        second = uuid.uuid4().hex
        await c.snapshot(v, 1, second, 2.0)
        batch = await c.read_snapshot_batch(v, 1, second, {2: blocks[::-1], 3: [0]})
        assert [(k, kind, bytes(body)) for k, kind, body in chunkdelta.decode_batch(batch)] == [
            (2, chunkdelta.DELTA, chunkdelta.encode(blocks, data)),
            (3, chunkdelta.DELTA, chunkdelta.encode([0], bytes(BLOCK_SIZE)))]
        with pytest.raises(InvalidArgument, match="blocks"):
            await c.read_snapshot_batch(v, 1, second, {2: [256]})
        with pytest.raises(InvalidArgument, match="blocks"):  # the bitmap says 6, 5 come
            await c.write_blocks(v, 1, 2 * MIB, chunkdelta.encode(blocks, data)[:-BLOCK_SIZE],
                                 3)
        with pytest.raises(InvalidArgument, match="chunk"):  # not at a chunk's start
            await c.write_blocks(v, 1, 2 * MIB + BLOCK_SIZE, chunkdelta.encode(blocks, data), 3)
        assert await c.read(v, 1, 2 * MIB, MIB) == bytes(want)  # refused: nothing written

    with_client(server, body)


def test_a_read_waiting_for_the_disk_holds_up_no_other_request() -> None:
    """A read the page cache cannot answer goes to a thread: the server answers the others
    meanwhile (on its event loop it would stall every volume it serves)."""
    async def body() -> None:
        store = MemoryChunkStore()
        server = await serve(store, "127.0.0.1", 0)
        slow_v, fast_v = vid(), vid()
        disk = threading.Event()
        try:
            async with DataClient(server.address) as client:
                for v in (slow_v, fast_v):
                    await client.create(v, MIB)
                    await client.write(v, 1, 0, b"s" * BLOCK_SIZE, 1)
                slow = store.replica(slow_v)
                read = slow.read

                def waits_for_the_disk(offset: int, length: int) -> bytes:
                    assert disk.wait(10)
                    return read(offset, length)

                slow.read_cached = lambda offset, length: None  # type: ignore[method-assign]
                slow.read = waits_for_the_disk  # type: ignore[method-assign]
                pending = asyncio.ensure_future(client.read(slow_v, 1, 0, BLOCK_SIZE))
                await asyncio.sleep(0.1)
                assert not pending.done()
                await asyncio.wait_for(client.write(fast_v, 1, BLOCK_SIZE, b"f" * BLOCK_SIZE, 2),
                                       2)
                assert await asyncio.wait_for(client.read(fast_v, 1, BLOCK_SIZE, BLOCK_SIZE),
                                              2) == b"f" * BLOCK_SIZE
                assert not pending.done()
                disk.set()
                assert await asyncio.wait_for(pending, 5) == b"s" * BLOCK_SIZE
        finally:
            disk.set()
            await server.close()

    run(body())


@pytest.mark.parametrize("failures", [1, 2])
def test_a_read_in_a_thread_that_fails_is_read_again_on_the_loop(failures: int) -> None:
    """In a thread, a read that meets a write of the same blocks can see a block without its
    checksum: it is read again where no write interleaves, and only a second failure is
    answered."""
    async def body() -> None:
        store = MemoryChunkStore()
        server = await serve(store, "127.0.0.1", 0)
        v = vid()
        try:
            async with DataClient(server.address) as client:
                await client.create(v, MIB)
                await client.write(v, 1, 0, b"r" * BLOCK_SIZE, 1)
                replica = store.replica(v)
                read = replica.read
                calls: list[int] = []

                def torn(offset: int, length: int) -> bytes:
                    calls.append(offset)
                    if len(calls) <= failures:
                        raise ChecksumMismatch(volume_id=v, offset=offset, server="s")
                    return read(offset, length)

                replica.read_cached = lambda offset, length: None  # type: ignore[method-assign]
                replica.read = torn  # type: ignore[method-assign]
                if failures == 1:
                    assert await client.read(v, 1, 0, BLOCK_SIZE) == b"r" * BLOCK_SIZE
                else:
                    with pytest.raises(ChecksumMismatch):
                        await client.read(v, 1, 0, BLOCK_SIZE)
                assert len(calls) == 2
        finally:
            await server.close()

    run(body())


@pytest.mark.parametrize("compiled", ["1", "0"])
def test_reads_from_the_disk_answer_what_was_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: str) -> None:
    """Reads that miss the page cache (every file of the replica dropped from it first) give
    what was written: plain blocks by the compiled pool or Python threads
    (CARGOHOLD_COMPILED), blocks moved by a snapshot by Python threads, never-written ones as
    zeros, a corrupt block as a checksum error."""
    monkeypatch.setenv("CARGOHOLD_COMPILED", compiled)
    process = ServerProcess(tmp_path)
    process.start()
    v = vid()
    written = bytearray(4 * MIB)
    rng = random.Random(3)

    async def body() -> None:
        async with DataClient(process.address) as c:
            await c.create(v, 8 * MIB)
            written[:] = os.urandom(4 * MIB)
            await c.write(v, 1, 0, written, 1)
            await c.snapshot(v, 1, uuid.uuid4().hex, 1.0)
            for block in rng.sample(range(1024), 40):  # moved: the snapshot keeps the old
                new = os.urandom(BLOCK_SIZE)
                await c.write(v, 1, block * BLOCK_SIZE, new, 2)
                written[block * BLOCK_SIZE:(block + 1) * BLOCK_SIZE] = new
            await c.flush(v, 1)
            for _ in range(2):
                for path in (process.root / "replicas" / v).iterdir():
                    fd = os.open(path, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                asks = [(rng.randrange(2048 - n) * BLOCK_SIZE, n)
                        for n in rng.choices([1, 3, 16, 256], k=200)]
                got = await asyncio.gather(*(c.read(v, 1, o, n * BLOCK_SIZE) for o, n in asks))
                want = bytes(written) + bytes(4 * MIB)
                for (o, n), data in zip(asks, got, strict=True):
                    assert data == want[o:o + n * BLOCK_SIZE], (o, n)
            with open(process.root / "replicas" / v / "data", "r+b") as f:
                os.pwrite(f.fileno(), b"bad", 5 * MIB // 2)
                os.fsync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            with pytest.raises(ChecksumMismatch):
                await c.read(v, 1, 2 * MIB, MIB)
            with pytest.raises(InvalidArgument):  # beyond the end: refused, not read
                await c.read(v, 1, 7 * MIB, 2 * MIB)

    try:
        run(body())
    finally:
        process.kill()


def test_write_buffers_retired_by_a_failed_connection_come_back_with_the_next(
        server: ServerProcess) -> None:
    """A connection that fails with a shared write unanswered retires its slot (the server
    may still have the request); the client's next connection SHAREs again, the server
    aborts whatever is left of the old one and says so, and the slot is used again."""
    sock = server.root / wire.LOCAL_SOCKET

    async def main() -> None:
        shared = SharedMemory(MIB, slots=2)
        c = DataClient(server.address, local_socket=str(sock), shared=shared)
        try:
            await c.connect()
            v = vid()
            await c.create(v, 8 * MIB)
            await c.fence(v, 1)
            slot = shared.take()
            assert slot is not None
            first = os.urandom(64 * 1024)
            shared.slot(slot)[:len(first)] = first
            server.signal(signal.SIGSTOP)  # the request stays in the socket, unanswered
            try:
                reply = c.start_write(v, 1, MIB, shared.slot(slot)[:len(first)], 2,
                                      slot * shared.slot_size)
                await asyncio.sleep(0.1)
                assert c._protocol is not None and c._protocol.transport is not None
                c._protocol.transport.abort()  # the client gives up on the connection
                with pytest.raises(DataServerUnavailable):
                    await reply
                shared.release(slot)  # the caller is done; the client's hold stays
                assert shared.free == 1
            finally:
                server.signal(signal.SIGCONT)
            await c.connect()  # SHARE again: the server answers that the old one is gone
            assert shared.free == 2
            slot = shared.take()
            assert slot is not None
            second = os.urandom(64 * 1024)
            shared.slot(slot)[:len(second)] = second
            await c.start_write(v, 1, MIB, shared.slot(slot)[:len(second)], 3,
                                slot * shared.slot_size)
            shared.release(slot)
            await asyncio.sleep(0.2)
            assert bytes(await c.read(v, 1, MIB, len(second))) == second

            # a connection of the same client while the first is up: the first is aborted
            again = DataClient(server.address, local_socket=str(sock), shared=shared)
            again._client = c._client
            await again.connect()
            try:
                for _ in range(100):
                    if not c.connected:
                        break
                    await asyncio.sleep(0.02)
                assert not c.connected
                other = DataClient(server.address, local_socket=str(sock), shared=shared)
                await other.connect()  # another client: the first two are left alone
                await asyncio.sleep(0.1)
                assert again.connected and other.connected
                await other.close()
            finally:
                await again.close()
        finally:
            await c.close()
            shared.close()

    asyncio.run(main())
