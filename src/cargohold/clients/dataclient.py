"""Asyncio client of one data server, with pipelining.

Any number of coroutines may call one ``DataClient`` at the same time: each request gets an
id, requests queued during one event loop turn go out in one write, and a single protocol
callback resolves the responses in whatever order the server sends them.

Statuses become the ``cargohold.errors`` classes (``_status_error``). A lost or refused
connection makes every pending and later call raise ``DataServerUnavailable`` at once; the
client never retries by itself. ``connect()`` may be called again to open a new connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import struct
import uuid
from types import TracebackType
from typing import Any, cast

from cargohold.clients.access import Access
from cargohold.clients.sharedmemory import SharedMemory
from cargohold.clients.sockets import detect_dead_peers, widen_send_buffer
from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.wire import (
    MAGIC,
    MAX_GENS_CHUNKS,
    MAX_PAYLOAD,
    REQUEST_HEADER,
    TRIM_COPY,
    VERSION,
    BytesLike,
    Op,
    Status,
    decode_json,
    decode_text,
    decode_u64,
    encode_json,
    encode_request_header,
    encode_u64,
    response_reader,
    volume_bytes,
)
from cargohold.errors import (
    CargoholdError,
    ChecksumMismatch,
    DataServerUnavailable,
    Fenced,
    InvalidArgument,
    NoSpace,
    NotAuthorized,
    ReplicaNotFound,
    from_dict,
)

log = logging.getLogger(__name__)

#: Payloads at least this big are handed to the transport on their own, never joined.
_LARGE = 64 << 10
#: Queued requests go out once this many frame pieces are waiting, not only at the end of the
#: loop turn, so that the server works on the first ones while the next ones are made.
_BATCH = 32
_BATCH_BYTES = 128 << 10
_CLOSE_GRACE = 1.0
_GENS_PAGE = MAX_GENS_CHUNKS
#: Seconds a control-plane caller (create, delete, resize, fence, a resync's or scrub's
#: copy) waits for each answer: a data server that stopped answering must not hang a create,
#: its rollback or the controller's pass. The engine's data path sets none.
CONTROL_TIMEOUT = 30.0
#: What a response resolves: the OK payload (``bytes``, or a ``memoryview`` of a buffer of its
#: own for large reads), or the status as a ``cargohold.errors`` exception.
Reply = asyncio.Future["bytes | memoryview"]
#: A request waiting for its response: its future, and the volume id and epoch for errors.
_Request = tuple[Reply, str, int]
_pack_request = REQUEST_HEADER.pack


class _Protocol(asyncio.BufferedProtocol):
    """One connection; reports to its client through the client's futures."""

    def __init__(self, client: DataClient) -> None:
        self._client = client
        self._reader = response_reader()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()  # kept: get_running_loop() costs a getpid()
        self.lost: asyncio.Future[None] = self.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        widen_send_buffer(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self._reader.feed(nbytes)
        except InvalidArgument as exc:
            log.error("data server %s sent a bad frame: %s", self._client.address, exc)
            self._client._fail(self, f"bad response frame: {exc}")
            if self.transport is not None:
                self.transport.abort()
            return
        client = self._client
        pending, reader, held = client._pending, self._reader, client._held
        for header, payload in frames:
            request = pending.pop(header.request_id, None)
            if request is None:
                continue
            future, volume_id, epoch = request
            if held and (slot := held.pop(future, None)) is not None:
                client._release(slot)  # the server is done reading the shared buffer
            if future.done():
                continue
            if header.status == Status.OK:
                # A large payload was received into a buffer of its own: hand it over as it
                # is. A small one is a view into the reader's buffer, reused after this call.
                future.set_result(bytes(payload) if reader.owns(payload) else payload)
            else:
                future.set_exception(client._status_error(
                    header.status, bytes(payload), volume_id, epoch))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._client._fail(self, f"connection lost: {exc}" if exc else "connection closed")
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._client._paused = True

    def resume_writing(self) -> None:
        self._client._resume()


class DataClient:
    """A pipelined connection to the data server at ``address`` ("host:port").

    ``local_socket``: the server's unix socket (``LOCAL_SOCKET`` in its directory) when it
    runs on this host; ``connect`` uses it if it exists, TCP otherwise.

    ``access``: TLS for TCP and the capabilities to present; the client sends the capability
    for a volume and epoch (Op.AUTHORIZE) right before the first request that needs it on
    each connection, pipelined, so it costs no round trip. ``peer``: the node the server
    runs on, which its TLS certificate must name.
    """

    def __init__(self, address: str, server_id: str = "", local_socket: str | None = None,
                 shared: SharedMemory | None = None, call_timeout: float | None = None,
                 access: Access | None = None, peer: str = "", copying: bool = False) -> None:
        """``call_timeout``: how long a call that names no timeout of its own waits for its
        answer (None: for ever, as the engine's data path wants; control operations set one,
        so that a data server that stopped answering cannot hang them). ``copying``: the
        connection carries a bulk copy (a restore, a fill, a rebuild), which the server
        keeps from filling its page cache."""
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidArgument(what="data server address", detail=f"{address!r}")
        self.address = address
        self.server_id = server_id
        self.call_timeout = call_timeout
        self._host, self._port = host.strip("[]"), int(port)
        self._local_socket = local_socket
        self._access = access
        self._peer = peer
        self._copying = copying
        self._granted: dict[str, int] = {}  # volume → epoch authorized on this connection
        self._protocol: _Protocol | None = None
        self._pending: dict[int, _Request] = {}
        self._next_id = 1
        self._problem = "not connected; call connect() first"
        self._out: list[BytesLike] = []
        self._out_scheduled = False
        self._out_bytes = 0
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # Write buffers shared with a data server on this host (``start_write``'s
        # ``shared_at``): offered on every unix connection, used once the server took them.
        self._shared = shared if local_socket is not None else None
        self._sharing = False
        self._held: dict[asyncio.Future[bytes | memoryview], int] = {}  # request → its slot
        # slots named by requests of a connection that failed: the server may still read
        # them, until a SHARE on a new connection answers that it dropped the old one
        self._retired: list[int] = []
        self._client = uuid.uuid4().hex

    # --- connection ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._protocol is not None and self._protocol.transport is not None

    async def connect(self, timeout: float = 2.0) -> None:
        """Open the connection; ``DataServerUnavailable`` if that fails within ``timeout``."""
        if self.connected:
            return
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        if self._local_socket is not None and os.path.exists(self._local_socket):
            try:
                _, protocol = await asyncio.wait_for(
                    loop.create_unix_connection(lambda: _Protocol(self), self._local_socket),
                    timeout,
                )
            except (TimeoutError, OSError) as exc:  # a stale socket file: TCP decides
                log.info("data server %s: unix socket %s: %s; using TCP", self.address,
                         self._local_socket, exc or "timeout")
        if protocol is not None:
            self._protocol = protocol
            self._paused = False
            self._problem = ""
            self._sharing = False
            self._granted = {}
            if self._shared is not None:
                await self._share(self._shared, timeout)
            await self._announce(timeout)
            return
        tls = self._access.tls if self._access is not None else None
        try:
            _, tcp = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self._host, self._port,
                                       ssl=tls, server_hostname=self._peer if tls else None),
                timeout,
            )
        except TimeoutError:
            raise self._unavailable(f"no connection within {timeout} s") from None
        except ssl.SSLError as exc:
            raise self._unavailable(f"TLS handshake failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise self._unavailable(f"cannot connect: {exc.strerror or exc}") from None
        detect_dead_peers(tcp.transport)
        self._protocol = tcp
        self._paused = False
        self._problem = ""
        self._sharing = False
        self._granted = {}
        await self._announce(timeout)

    async def _announce(self, timeout: float) -> None:
        """Tell the server what the connection carries (HELLO with a payload)."""
        if self._copying:
            await self._call(Op.HELLO, "", payload=encode_json({"copying": True}),
                             timeout=timeout)

    async def _share(self, shared: SharedMemory, timeout: float) -> None:
        """Offer the write buffers to the server; a server that cannot map them gets
        every write's data in the frame, as over TCP."""
        try:
            answer = await self._call(Op.SHARE, "", payload=encode_json(
                {"path": shared.path, "token": shared.token.hex(), "client": self._client}),
                timeout=timeout)
        except InvalidArgument as exc:
            log.info("data server %s does not map shared write buffers: %s", self.address, exc)
            return
        self._sharing = True
        body = decode_json(answer) if answer else None  # a server before 2026-12-07: b""
        if self._retired and isinstance(body, dict) and body.get("alone") is True:
            log.info("data server %s: %d retired write buffers back in use", self.address,
                     len(self._retired))
            for slot in self._retired:  # the old connection is gone on the server too
                shared.release(slot)
            self._retired = []

    def _release(self, slot: int) -> None:
        if self._shared is not None:
            self._shared.release(slot)

    async def close(self) -> None:
        """Close the connection; calls still pending raise ``DataServerUnavailable``."""
        protocol, self._protocol = self._protocol, None
        self._problem = "the client was closed"
        self._fail_pending()
        if protocol is None or protocol.transport is None:
            return
        protocol.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(protocol.lost), _CLOSE_GRACE)
        except TimeoutError:
            if protocol.transport is not None:
                protocol.transport.abort()
            await protocol.lost

    def abort(self) -> None:
        """Drop the connection at once: every pending call fails now (for an engine whose
        node lost its lease, whose requests may be stuck on a host cut off)."""
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    async def __aenter__(self) -> DataClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- ops --------------------------------------------------------------------------------

    async def hello(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Server info: id, version, address, capacity, free, used, provisioned, replicas."""
        info: dict[str, Any] = decode_json(await self._call(Op.HELLO, "", timeout=timeout))
        if not self.server_id:
            self.server_id = str(info.get("id", ""))
        return info

    async def create(self, volume_id: str, size: int, *, timeout: float | None = None) -> None:
        """Create an empty replica (idempotent for the same size)."""
        await self._call(Op.CREATE, volume_id, payload=encode_json({"size": size}), timeout=timeout)

    async def resize(self, volume_id: str, size: int, *, timeout: float | None = None) -> int:
        """Grow a replica to at least ``size`` bytes (never shrinks); return its size now."""
        body = decode_json(
            await self._call(
                Op.RESIZE, volume_id, payload=encode_json({"size": size}), timeout=timeout
            )
        )
        if not isinstance(body, dict) or not isinstance(body.get("size"), int):
            raise CargoholdError(detail=f"data server {self.address} answered RESIZE with {body}")
        return int(body["size"])

    async def delete(self, volume_id: str, *, timeout: float | None = None) -> None:
        """Delete a replica (idempotent)."""
        await self._call(Op.DELETE, volume_id, timeout=timeout)

    async def stat(self, volume_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Replica info: volume_id, size, used, epoch, chunks_written."""
        info: dict[str, Any] = decode_json(await self._call(Op.STAT, volume_id, timeout=timeout))
        return info

    async def read(
        self,
        volume_id: str,
        epoch: int,
        offset: int,
        length: int,
        *,
        timeout: float | None = None,
    ) -> bytes:
        return await self._call(
            Op.READ, volume_id, epoch=epoch, offset=offset, length=length, timeout=timeout
        )

    async def write(
        self,
        volume_id: str,
        epoch: int,
        offset: int,
        data: BytesLike,
        generation: int,
        *,
        timeout: float | None = None,
    ) -> None:
        """Write ``data``; acknowledged once in the server's page cache (``flush`` to persist).

        ``data`` must stay unchanged until the call returns.
        """
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        await self._call(
            Op.WRITE,
            volume_id,
            epoch=epoch,
            offset=offset,
            length=len(view),
            generation=generation,
            payload=view,
            timeout=timeout,
        )

    async def write_blocks(self, volume_id: str, epoch: int, offset: int, body: BytesLike,
                           generation: int, *, timeout: float | None = None) -> None:
        """Write some 4 KiB blocks of the chunk at ``offset`` (``body``: core/chunkdelta.py)
        in one request."""
        await self._call(Op.WRITE_BLOCKS, volume_id, epoch=epoch, offset=offset,
                         length=len(body), generation=generation, payload=body,
                         timeout=timeout)

    def start_read(self, volume_id: str, epoch: int, offset: int, length: int) -> Reply:
        """Send a READ now; the future gives the data (a ``memoryview`` if large) or raises.

        The engine's data path uses this instead of ``read``: no coroutine or task per request.
        """
        return self._start(Op.READ, volume_id, epoch, offset, length, 0, b"")

    def start_write(self, volume_id: str, epoch: int, offset: int, data: BytesLike,
                    generation: int, shared_at: int = -1) -> Reply:
        """Send a WRITE now (``write`` without a coroutine); the future resolves or raises.

        ``data`` must stay unchanged until the future is done. ``shared_at``: where ``data``
        lies in the ``SharedMemory`` given to the constructor. A server that mapped it gets
        the position instead of the bytes (WRITE_SHARED), and this client holds the slot
        until the server answered; if the connection fails first, the hold stays (the
        server may still read the slot) and the slot is never reused.
        """
        if shared_at >= 0 and self._sharing and not self._paused:
            reply = self._start(Op.WRITE_SHARED, volume_id, epoch, offset, len(data),
                                generation, encode_u64(shared_at))
            if not reply.done() and self._shared is not None:
                self._held[reply] = self._shared.hold(shared_at)
            return reply
        return self._start(Op.WRITE, volume_id, epoch, offset, len(data), generation, data)

    async def flush(self, volume_id: str, epoch: int, *, timeout: float | None = None) -> None:
        """Make every write acknowledged so far durable on this server."""
        await self._call(Op.FLUSH, volume_id, epoch=epoch, timeout=timeout)

    async def trim(
        self,
        volume_id: str,
        epoch: int,
        offset: int,
        length: int,
        generation: int = 0,
        *,
        copy: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Deallocate a range (reads return zeros). ``generation`` is recorded on the chunks
        written before, or with ``copy`` (zeros copied from another replica) on every chunk."""
        await self._call(
            Op.TRIM,
            volume_id,
            epoch=epoch,
            offset=offset,
            length=length,
            generation=generation,
            payload=TRIM_COPY if copy else b"",
            timeout=timeout,
        )

    async def generations(self, volume_id: str, *, timeout: float | None = None) -> bytes:
        """Every chunk's generation as little-endian u64s (fetched in pages if big).

        ``timeout`` applies to each page.
        """
        pages: list[bytes] = []
        offset = 0
        while True:
            page = await self._call(
                Op.GENS, volume_id, offset=offset, length=_GENS_PAGE, timeout=timeout
            )
            pages.append(page)
            if len(page) < _GENS_PAGE * 8:
                return page if len(pages) == 1 else b"".join(pages)
            offset += _GENS_PAGE * CHUNK_SIZE

    async def fence(self, volume_id: str, epoch: int, *, timeout: float | None = None) -> None:
        """Raise the replica's epoch: I/O with a lower epoch is refused from now on."""
        await self._call(Op.FENCE, volume_id, epoch=epoch, timeout=timeout)

    async def snapshot(self, volume_id: str, epoch: int, snapshot_id: str, created: float,
                       *, timeout: float | None = None) -> dict[str, Any]:
        """Keep the replica as it is now as ``snapshot_id`` (idempotent): everything
        written before is in it, durably. Returns the snapshot's info."""
        info: dict[str, Any] = decode_json(await self._call(
            Op.SNAPSHOT, volume_id, epoch=epoch, timeout=timeout,
            payload=encode_json({"id": snapshot_id, "created": created})))
        return info

    async def snapshots(self, volume_id: str, *,
                        timeout: float | None = None) -> list[dict[str, Any]]:
        """The snapshots the replica keeps, oldest first (id, number, created, unique)."""
        found: list[dict[str, Any]] = decode_json(
            await self._call(Op.SNAPSHOTS, volume_id, timeout=timeout))
        return found

    async def delete_snapshot(self, volume_id: str, epoch: int, snapshot_id: str, *,
                              timeout: float | None = None) -> int:
        """Forget a snapshot (a missing one is no error); return the bytes freed."""
        body = decode_json(await self._call(
            Op.SNAPSHOT_DELETE, volume_id, epoch=epoch, timeout=timeout,
            payload=encode_json({"id": snapshot_id})))
        return int(body["freed"])

    async def read_snapshot(self, volume_id: str, epoch: int, snapshot_id: str, offset: int,
                            length: int, *, timeout: float | None = None) -> bytes:
        return await self._call(Op.READ_SNAPSHOT, volume_id, epoch=epoch, offset=offset,
                                length=length, timeout=timeout,
                                payload=encode_json({"id": snapshot_id}))

    async def read_snapshot_batch(self, volume_id: str, epoch: int, snapshot_id: str,
                                  wanted: dict[int, list[int]], *,
                                  timeout: float | None = None) -> bytes:
        """Some 4 KiB blocks of several chunks of the snapshot (``wanted``: chunk -> block
        numbers in it), as a batch of delta records (``core/chunkdelta.py``), in one
        request."""
        return await self._call(Op.READ_SNAPSHOT, volume_id, epoch=epoch, timeout=timeout,
                                payload=encode_json({"id": snapshot_id, "blocks": [
                                    [chunk, blocks] for chunk, blocks in wanted.items()]}))

    async def fill(self, volume_id: str, epoch: int, offset: int, data: BytesLike,
                   generation: int, *, timeout: float | None = None) -> bool:
        """Write one chunk's first contents (a clone's) only if that chunk was never
        written; return whether it was."""
        view = memoryview(data).cast("B")
        body = decode_json(await self._call(
            Op.FILL, volume_id, epoch=epoch, offset=offset, length=len(view),
            generation=generation, payload=view, timeout=timeout))
        return bool(body["written"])

    async def revert(self, volume_id: str, epoch: int, snapshot_id: str, generation: int, *,
                     timeout: float | None = None) -> int:
        """Make the replica read as the snapshot again; return the bytes changed."""
        body = decode_json(await self._call(
            Op.REVERT, volume_id, epoch=epoch, generation=generation, timeout=timeout,
            payload=encode_json({"id": snapshot_id})))
        return int(body["changed"])

    async def snapshot_diff(self, volume_id: str, since: str = "", until: str = "", *,
                            blocks: bool = False, timeout: float | None = None) -> list[int]:
        """The chunks (``blocks``: the 4 KiB blocks, ``since`` given) that may differ
        between snapshot ``since`` ("": nothing) and ``until`` ("": the replica now)."""
        ask: dict[str, object] = {"since": since, "until": until}
        if blocks:
            ask["blocks"] = True
        found: list[int] = decode_json(await self._call(
            Op.SNAPSHOT_DIFF, volume_id, timeout=timeout, payload=encode_json(ask)))
        return found

    async def scrub_snapshots(self, volume_id: str, epoch: int, *,
                              timeout: float | None = None) -> list[tuple[str, int]]:
        """(snapshot id, byte offset) of each block the snapshots hold whose checksum
        fails on this replica."""
        found = decode_json(await self._call(Op.SNAPSHOT_SCRUB, volume_id, epoch=epoch,
                                             timeout=timeout))
        return [(str(f["snapshot"]), int(f["offset"])) for f in found]

    async def repair_snapshot(self, volume_id: str, epoch: int, snapshot_id: str, offset: int,
                              data: bytes, *, timeout: float | None = None) -> None:
        await self._call(Op.SNAPSHOT_REPAIR, volume_id, epoch=epoch, offset=offset,
                         length=len(data), timeout=timeout,
                         payload=snapshot_id.encode() + data)

    # --- machinery ------------------------------------------------------------------------

    async def _call(
        self,
        op: Op,
        volume_id: str,
        *,
        epoch: int = 0,
        offset: int = 0,
        length: int = 0,
        generation: int = 0,
        payload: BytesLike = b"",
        timeout: float | None = None,
    ) -> bytes:
        if self._paused and self.connected:
            await self._wait_writable()
        if ((epoch or op is Op.READ_SNAPSHOT) and self._access is not None
                and self._granted.get(volume_id) != epoch):
            self._authorize(volume_id, epoch)
        future = self._submit(op, volume_id, epoch, offset, length, generation, payload)
        if timeout is None:
            timeout = self.call_timeout
        try:
            if timeout is None:
                body = await future
            else:
                body = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise self._unavailable(f"no answer to {op.name} within {timeout} s") from None
        finally:
            if not future.done():  # cancelled or timed out: forget the request
                self._pending = {k: v for k, v in self._pending.items() if v[0] is not future}
        return body if isinstance(body, bytes) else bytes(body)

    def _submit(self, op: Op, volume_id: str, epoch: int, offset: int, length: int,
                generation: int, payload: BytesLike) -> Reply:
        """Queue one request now; its future resolves when the response arrives."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            raise self._unavailable()
        request_id = self._take_id()
        header = encode_request_header(
            op,
            request_id,
            volume_id,
            epoch=epoch,
            offset=offset,
            length=length,
            generation=generation,
            payload_length=len(payload),
        )
        future: Reply = protocol.loop.create_future()
        self._pending[request_id] = (future, volume_id, epoch)
        self._send(protocol.loop, protocol.transport, header, payload)
        return future

    def _start(self, op: Op, volume_id: str, epoch: int, offset: int, length: int,
               generation: int, payload: BytesLike) -> Reply:
        """``_submit_soon`` for the data path: the common case in as few calls as possible.

        Anything unusual (not connected, paused, a header that does not encode) goes through
        ``_submit_soon``, which turns it into the same waiting or failed future.
        """
        protocol = self._protocol
        if protocol is None or protocol.transport is None or self._paused:
            return self._submit_soon(op, volume_id, epoch, offset, length, generation, payload)
        if self._access is not None and self._granted.get(volume_id) != epoch:
            self._authorize(volume_id, epoch)
        transport = protocol.transport
        size = len(payload)
        try:
            if size > MAX_PAYLOAD:
                raise InvalidArgument(what="payload", detail=f"{size} bytes > {MAX_PAYLOAD}")
            volume = volume_bytes(volume_id)
            request_id = self._next_id
            if request_id in self._pending:
                request_id = self._take_id()
            else:
                self._next_id = (request_id + 1) & 0xFFFFFFFF
            header = _pack_request(MAGIC, VERSION, op, request_id, volume, epoch, offset, length,
                                   generation, size)
        except (CargoholdError, struct.error):
            return self._submit_soon(op, volume_id, epoch, offset, length, generation, payload)
        future: Reply = protocol.loop.create_future()
        self._pending[request_id] = (future, volume_id, epoch)
        self._send(protocol.loop, transport, header, payload)
        return future

    def _submit_soon(self, op: Op, volume_id: str, epoch: int, offset: int, length: int,
                     generation: int, payload: BytesLike) -> Reply:
        """``_submit``, but as a future that never raises at once (for ``start_*``).

        While the connection is paused (the server does not keep up) the request waits for
        it to drain first, as ``_call`` does, so that the transport's buffer stays bounded.
        """
        try:
            if not (self._paused and self.connected):
                return self._submit(op, volume_id, epoch, offset, length, generation, payload)
        except CargoholdError as exc:
            failed: Reply = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed
        return asyncio.ensure_future(self._call(op, volume_id, epoch=epoch, offset=offset,
                                                length=length, generation=generation,
                                                payload=payload))

    def _authorize(self, volume_id: str, epoch: int) -> None:
        """Queue the capability for ``volume_id`` at ``epoch`` before the request that needs
        it; the server executes a connection's requests in order. A refusal is logged: the
        request after it fails with ``NotAuthorized`` itself."""
        protocol = self._protocol
        assert self._access is not None
        capability = self._access.capability(volume_id, epoch)
        if protocol is None or protocol.transport is None or capability is None:
            return
        try:
            future = self._submit(Op.AUTHORIZE, volume_id, epoch, 0, 0, 0, capability)
        except CargoholdError:  # a bad volume id: the request itself reports it
            return
        self._granted[volume_id] = epoch
        future.add_done_callback(self._authorized)

    def _authorized(self, future: Reply) -> None:
        if not future.cancelled() and (exc := future.exception()) is not None:
            if not isinstance(exc, DataServerUnavailable):
                log.warning("data server %s refused a capability: %s", self.address, exc)

    def _take_id(self) -> int:
        request_id = self._next_id
        while request_id in self._pending:
            request_id = (request_id + 1) & 0xFFFFFFFF
        self._next_id = (request_id + 1) & 0xFFFFFFFF
        return request_id

    def _send(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, header: bytes,
              payload: BytesLike) -> None:
        if len(payload) >= _LARGE:
            self._write_out()
            transport.write(header)
            transport.write(payload)
            return
        out = self._out
        out.append(header)
        if payload:
            out.append(payload)
            self._out_bytes += len(payload)
        if len(out) >= _BATCH or self._out_bytes >= _BATCH_BYTES:
            self._write_out()  # let the server start on these while more are queued
        elif not self._out_scheduled:
            self._out_scheduled = True
            loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        """Send the requests queued in this loop turn with one write."""
        self._out_scheduled = False
        out, self._out, self._out_bytes = self._out, [], 0
        protocol = self._protocol
        if not out or protocol is None or protocol.transport is None:
            return
        protocol.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def _wait_writable(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _resume(self) -> None:
        self._paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, protocol: _Protocol, problem: str) -> None:
        """``protocol``'s connection is gone: fail everything waiting on it."""
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._problem = problem
        log.warning("data server %s at %s: %s", self.server_id or "?", self.address, problem)
        self._fail_pending()

    def _fail_pending(self) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        self._sharing = False
        self._granted = {}
        if self._held:  # unanswered: the server may still read these slots, so keep them
            log.warning("data server %s: %d shared write buffers retired until the next "
                        "connection", self.address, len(self._held))
            self._retired += self._held.values()
            self._held.clear()
        self._out, self._out_bytes = [], 0
        for future, _volume_id, _epoch in pending:
            if not future.done():
                future.set_exception(self._unavailable())
        self._resume()

    def _unavailable(self, problem: str = "") -> DataServerUnavailable:
        return DataServerUnavailable(
            server=self.server_id or "?", address=self.address, detail=problem or self._problem
        )

    def _status_error(self, status: int, body: bytes, volume_id: str, epoch: int) -> CargoholdError:
        """The one place where wire statuses become errors."""
        server = self.server_id or self.address
        if status == Status.NOT_FOUND:
            return ReplicaNotFound(server=server, volume_id=volume_id)
        if status == Status.FENCED:
            return Fenced(volume_id=volume_id, epoch=epoch, current=decode_u64(body))
        if status == Status.CHECKSUM:
            return ChecksumMismatch(volume_id=volume_id, offset=decode_u64(body), server=server)
        text = decode_text(body)
        if status == Status.NO_SPACE:
            return NoSpace(server=server, detail=text)
        if status == Status.INVALID:
            what, sep, detail = text.partition(": ")
            return (
                InvalidArgument(what=what, detail=detail)
                if sep
                else InvalidArgument(what="request", detail=text)
            )
        if status == Status.FORBIDDEN:
            what, _, detail = text.partition(": ")
            return NotAuthorized(what=what, detail=detail)
        if status == Status.IO_ERROR:
            return CargoholdError(detail=f"I/O error on data server {server}: {text}")
        if status == Status.REFUSED:
            try:
                return from_dict(json.loads(text))
            except (ValueError, AttributeError):
                return CargoholdError(detail=f"data server {server} refused: {text}")
        return CargoholdError(detail=f"data server {server} answered unknown status {status}")
