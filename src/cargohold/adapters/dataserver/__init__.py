"""The data protocol's server side: a disk's replicas served to engines and nodes.

Requests are answered in the event loop thread as they arrive (a connection may pipeline
many), except FLUSH and the like, whose fdatasync runs in a worker thread, and reads the
page cache cannot answer, which ``disk_reads`` does (stores/diskreads.py): neither stalls the
other requests of its connection nor other connections. Responses produced by one batch of
received bytes go out in one write. Store errors map to statuses in ``statuses.py``.

The process around it (one per disk: signals, ready file, heap settings) is
:mod:`cargohold.daemons.dataserver`; its store is :mod:`cargohold.stores.diskstore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

from cargohold.adapters.dataserver import fastio
from cargohold.adapters.dataserver.sharing import map_offered
from cargohold.adapters.dataserver.statuses import error_response
from cargohold.clients.sockets import unix_listener, widen_send_buffer
from cargohold.config import FRAME_TIMEOUT, MAX_CONNECTIONS
from cargohold.core import chunkdelta
from cargohold.core.capability import SNAPSHOT_READS, Capability
from cargohold.core.faults import Faults
from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.periodic import Periodic
from cargohold.core.wire import (
    MAGIC,
    MAX_GENS_CHUNKS,
    MAX_PAYLOAD,
    RESPONSE_HEADER,
    TRIM_COPY,
    VERSION,
    BytesLike,
    Op,
    RequestHeader,
    Status,
    decode_json,
    decode_u64,
    encode_json,
    encode_response_header,
    request_reader,
    volume_bytes,
)
from cargohold.errors import (
    CargoholdError,
    InvalidArgument,
    NotAuthorized,
)
from cargohold.stores.chunkstore import ChunkStore, StoredReplica
from cargohold.stores.diskreads import DiskReads

log = logging.getLogger(__name__)

#: Payloads at least this big are written to the socket on their own instead of joined.
_LARGE = 64 << 10
#: How long a stopping server waits for its connections to drain their responses.
_CLOSE_GRACE = 2.0
#: Every ``WRITEBACK_INTERVAL`` seconds, a replica that took at least ``WRITEBACK_AFTER``
#: small writes (``SMALL_WRITE``) since its last turn starts the writeback of the chunks
#: they went to (``StoredReplica.start_writeback``).
#: Scattered small writes would otherwise pile up until a flush, which then writes each on
#: its own: under 4K random writes the file system in the volume flushes every 5 s,
#: fdatasync took 1-2 s, and the volume's loop device serves nothing else meanwhile (fio,
#: 2 replicas: max latency 2.0 s; 0.68 s with this, IOPS +4-10%). Large writes are left to
#: the kernel: they flush at disk speed, and starting them early made a 1 GiB burst to 2
#: replicas on one disk run at ~210 instead of ~390 MB/s.
WRITEBACK_INTERVAL = 1.0
#: Runs of blocks of deleted snapshots punched per replica per ``WRITEBACK_INTERVAL``.
RECLAIM_RUNS = 4096
WRITEBACK_AFTER = 256
#: Bounds on what one client can make a data server hold (with ``MAX_CONNECTIONS`` and
#: ``FRAME_TIMEOUT`` from config.py). An engine keeps at most 64 requests of 1 MiB in flight
#: and a resync 8: these leave room for both and stop a client that pipelines reads it never
#: collects, opens connections without end, or stops half way through a frame.
MAX_UNREAD = 128 << 20  # bytes of answers queued on one connection that its peer has not read
_LATER = object()  # a handler's result: the response is sent when the work completes
READ_THREADS = 16  # reads from the disk at once: what a disk's queue is worth
_pack_response = RESPONSE_HEADER.pack  # encode_response_header, inlined for the OK answers

Handler = Callable[["_Connection", RequestHeader, memoryview], object]


@dataclass(frozen=True)
class Guard:
    """What a data server asks beyond its transports (TCP with TLS of the cluster CA, and the
    root-only unix socket; both admit nodes only): I/O and FENCE on a replica only at the
    epoch of a capability signed with the cluster ``key`` (Op.AUTHORIZE on the connection),
    from the node it names: the TLS peer's certificate, or ``node`` (this host) on the unix
    socket. Over plaintext TCP (an operator's explicit choice) the node cannot be checked."""

    key: bytes = field(repr=False)
    node: str


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: DataProtocolServer) -> None:
        self._server = server
        self._store = server.store
        self._reader = request_reader(reuse_large=True)  # requests are served at once
        self._transport: asyncio.Transport | None = None
        self._out: list[BytesLike] = []
        self._shared: mmap.mmap | None = None  # the client's write buffers (Op.SHARE)
        self._shared_view: memoryview | None = None
        self._sharer = ""  # the client this connection maps the buffers of (pid:client id)
        self._unsent = 0  # bytes of read answers queued in ``_out``
        self._reading = 0  # bytes of reads in threads
        self._received = 0  # bytes received so far (the stall watch compares them)
        self._watch: asyncio.TimerHandle | None = None
        self._guard = server.guard
        self._grants: dict[str, int] = {}  # volume → the epoch a capability allows here
        self._copying = False  # a bulk copy's connection (HELLO): its writes drop behind
        self._fast = fastio.make(_LARGE)  # plain I/O served in C (None: all in Python)
        self.identity: str | None = None  # the node at the other end, when known
        self.peer = "?"
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        widen_send_buffer(transport)  # answers to 1 MiB reads leave in one piece
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")
        self.identity = _identity(transport, self._guard)
        server = self._server
        if len(server.connections) >= server.max_connections:
            log.warning("refusing connection from %s: %d connections already", self.peer,
                        len(server.connections))
            transport.close()
            return
        server.connections.add(self)
        self._watch_stalls(-1)
        log.debug("connection from %s", self.peer)

    def _watch_stalls(self, received: int) -> None:
        """Close a connection that received nothing for a whole ``frame_timeout`` while
        holding part of a frame; look again one period later otherwise."""
        if self._transport is None:
            return
        if received == self._received and self._reader.partial():
            log.warning("closing connection from %s: half a frame for %.0f s", self.peer,
                        self._server.frame_timeout)
            self.abort()
            return
        self._watch = asyncio.get_running_loop().call_later(
            self._server.frame_timeout, self._watch_stalls, self._received)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._watch is not None:
            self._watch.cancel()
        self._transport = None
        self._unshare()
        if self._fast is not None:
            self._fast.clear()
            writes, reads = self._server.compiled_before
            self._server.compiled_before = (writes + self._fast.served,
                                            reads + self._fast.reads_served)
            self._fast = None
        if self._server.sharers.get(self._sharer) is self:
            del self._server.sharers[self._sharer]
        if not self.lost.done():
            self.lost.set_result(None)
        log.debug("connection from %s closed (%s)", self.peer, exc or "eof")

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._received += nbytes
        fast = self._serve_fast if self._fast is not None and not self._server.faults.bad \
            else None
        try:
            self._reader.each(nbytes, self._handle, fast)
        except InvalidArgument as exc:
            log.warning("closing connection from %s: %s", self.peer, exc)
            self.close()
            return
        self._send()

    def compiled(self) -> tuple[int, int]:
        fast = self._fast
        return (0, 0) if fast is None else (int(fast.served), int(fast.reads_served))

    def _serve_fast(self, view: memoryview, pos: int, end: int) -> int:
        transport = self._transport
        budget = MAX_UNREAD - self._unsent - self._reading - (
            transport.get_write_buffer_size() if transport else 0)
        fast = self._fast
        served: int = fast.serve(view, pos, end, self._out, budget)
        self._unsent += fast.queued
        return served

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:  # the peer does not read its responses: stop reading
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # --- requests ------------------------------------------------------------------------

    def _handle(self, header: RequestHeader, payload: memoryview) -> None:
        handler = _HANDLERS.get(header.op)
        try:
            if handler is None:
                raise InvalidArgument(what="op", detail=f"unknown op {header.op}")
            result = handler(self, header, payload)
        except Exception as exc:  # every failure becomes a status; the server goes on
            status, body = error_response(exc, header, self._store, self._server.faults)
            self._queue(status, header.request_id, body)
            return
        if self._server.faults.bad and header.op in REWRITES:
            self._server.faults.rewritten(header.volume_id, header.offset, header.length)
        if result is not _LATER:
            assert isinstance(result, bytes)
            out = self._out
            out.append(_pack_response(MAGIC, VERSION, Status.OK, header.request_id, len(result)))
            if result:
                out.append(result)

    def _queue(self, status: Status, request_id: int, body: bytes) -> None:
        self._out.append(encode_response_header(status, request_id, len(body)))
        if body:
            self._out.append(body)

    def _send(self) -> None:
        out, self._out = self._out, []
        self._unsent = 0
        transport = self._transport
        if not out or transport is None or transport.is_closing():
            return
        small: list[BytesLike] = []
        for item in out:
            if len(item) < _LARGE:
                small.append(item)
                continue
            if small:
                transport.write(b"".join(small))
                small = []
            transport.write(item)
        if small:
            transport.write(small[0] if len(small) == 1 else b"".join(small))

    def _io_replica(self, header: RequestHeader) -> StoredReplica:
        """The replica of an I/O request, fenced with the request's epoch."""
        if header.epoch == 0:
            raise InvalidArgument(
                what="epoch", detail=f"{Op(header.op).name} needs an epoch of at least 1"
            )
        self._check_grant(header)
        replica = self._store.replica(header.volume_id)
        if header.epoch != replica.epoch:
            replica.fence(header.epoch)
        return replica

    def _check_grant(self, header: RequestHeader) -> None:
        """I/O and FENCE only at the epoch a capability on this connection allows."""
        if self._guard is not None and self._grants.get(header.volume_id) != header.epoch:
            raise NotAuthorized(what=Op(header.op).name,
                                detail=f"no capability for volume {header.volume_id} at "
                                       f"epoch {header.epoch} on this connection")

    def _authorize(self, header: RequestHeader, payload: memoryview) -> bytes:
        """Take a capability: I/O on its volume at its epoch is allowed on this connection
        from now on (one volume holds one epoch per connection)."""
        guard = self._guard
        if guard is None:
            return b""  # an open server (a test's, in process) takes any epoch
        capability = Capability.verify(guard.key, header.volume_id, header.epoch, payload)
        if self.identity is not None and capability.node != self.identity:
            raise NotAuthorized(what="AUTHORIZE",
                                detail=f"the capability is node {capability.node!r}'s, the "
                                       f"connection node {self.identity!r}'s")
        self._grants[header.volume_id] = header.epoch
        if self._fast is not None:
            self._fast.forget(volume_bytes(header.volume_id))
        return b""

    def _hello(self, header: RequestHeader, payload: memoryview) -> bytes:
        """Server info; a payload ``{"copying": true}`` says that the connection carries a
        bulk copy, whose writes leave the page cache behind it (``StoredReplica.copied``)."""
        if payload:
            body = decode_json(payload)
            if not isinstance(body, dict):
                raise InvalidArgument(what="HELLO", detail="the payload is a JSON object")
            self._copying = bool(body.get("copying"))
            if self._copying and self._fast is not None:
                self._fast.clear()  # its writes drop behind: the Python path does that
        store = self._store
        return encode_json(
            {
                "id": store.server_id,
                "version": VERSION,
                "address": self._server.address,
                "capacity": store.capacity(),
                "free": store.free(),
                "used": store.used(),
                "provisioned": store.provisioned(),
                "reserve": store.reserve(),
                "replicas": store.replica_ids(),
                "faults": self._server.faults.to_dict(),
            }
        )

    def _create(self, header: RequestHeader, payload: memoryview) -> bytes:
        body = decode_json(payload)
        if not isinstance(body, dict) or "size" not in body:
            raise InvalidArgument(what="payload", detail='CREATE needs {"size": bytes}')
        self._store.create(header.volume_id, body["size"])
        return b""

    def _resize(self, header: RequestHeader, payload: memoryview) -> bytes:
        body = decode_json(payload)
        if not isinstance(body, dict) or "size" not in body:
            raise InvalidArgument(what="payload", detail='RESIZE needs {"size": bytes}')
        return encode_json({"size": self._store.grow(header.volume_id, body["size"])})

    def _delete(self, header: RequestHeader, payload: memoryview) -> bytes:
        self._store.delete(header.volume_id)
        return b""

    def _stat(self, header: RequestHeader, payload: memoryview) -> bytes:
        return encode_json(self._store.replica(header.volume_id).info().to_dict())

    def _read(self, header: RequestHeader, payload: memoryview) -> object:
        replica = self._io_replica(header)
        if header.length > MAX_PAYLOAD:
            raise InvalidArgument(what="length", detail=f"reads are limited to {MAX_PAYLOAD}")
        transport = self._transport
        unread = self._unsent + self._reading + (
            transport.get_write_buffer_size() if transport else 0)
        if unread + header.length > MAX_UNREAD:
            raise InvalidArgument(what="READ", detail=f"{unread} bytes of answers are still "
                                  "unread on this connection; read them before asking more")
        data = replica.read_cached(header.offset, header.length) \
            if header.length <= _LARGE else None
        if data is not None:
            self._unsent += len(data)
            if self._fast is not None and not self._copying:
                self._allow_fast(header, replica)
            return data
        self._reading += header.length  # from the disk, while the loop serves the others:
        place = replica.read_place(header.offset, header.length)
        if place is None:  # blocks moved by snapshots: in a Python thread
            return self._in_worker(header, _as_is, replica.read, header.offset, header.length,
                                   then=partial(self._read_done, header, replica))
        self._server.disk_reads.read(*place, header.length,
                                     partial(self._read_raw, header, replica))
        return _LATER

    def _read_raw(self, header: RequestHeader, replica: StoredReplica,
                  raw: bytes | OSError) -> None:
        """The bytes of a read done by ``disk_reads``, checked here."""
        self._reading -= header.length
        try:
            if isinstance(raw, OSError):
                raise raw
            data = replica.read_verified(header.offset, header.length, raw)
        except Exception:
            return self._read_again(header, replica)
        self._queue(Status.OK, header.request_id, data)
        self._send()

    def _read_done(self, header: RequestHeader, replica: StoredReplica,
                   done: asyncio.Future[Any]) -> None:
        self._reading -= header.length
        if not done.cancelled() and done.exception() is None:
            return self._answered(header, _as_is, done)
        self._server.flushes.discard(done)
        self._read_again(header, replica)

    def _read_again(self, header: RequestHeader, replica: StoredReplica) -> None:
        """A read done elsewhere that failed, read again here, where no write lands between
        a block and its checksum (elsewhere, a read meeting a write of the same blocks can
        see the one without the other): only this answer's failure is the client's."""
        try:
            self._queue(Status.OK, header.request_id, replica.read(header.offset, header.length))
        except Exception as exc:
            status, body = error_response(exc, header, self._store, self._server.faults)
            self._queue(status, header.request_id, body)
        self._send()

    def _write(self, header: RequestHeader, payload: memoryview) -> bytes:
        replica = self._io_replica(header)
        if header.length != len(payload):
            raise InvalidArgument(
                what="length", detail=f"header says {header.length}, payload is {len(payload)}"
            )
        replica.write(header.offset, payload, header.generation)
        if self._copying:
            replica.copied(header.offset, len(payload))
        elif self._fast is not None:
            self._allow_fast(header, replica)
        return b""

    def _allow_fast(self, header: RequestHeader, replica: StoredReplica) -> None:
        """Let the compiled path serve this volume's plain I/O at this epoch from now on
        (fastio.py), if the replica has a compiled writer open."""
        writer = replica.fast_io()
        if writer is not None and not self._server.faults.bad:
            self._fast.allow(volume_bytes(header.volume_id), writer,
                             header.epoch if self._guard is not None else 0)

    def _write_blocks(self, header: RequestHeader, payload: memoryview) -> bytes:
        replica = self._io_replica(header)
        if header.offset % CHUNK_SIZE or header.length != len(payload):
            raise InvalidArgument(what="WRITE_BLOCKS", detail="a chunk's offset and payload")
        end = 0
        for at, data in chunkdelta.decode(payload):
            replica.write(header.offset + at, data, header.generation)
            end = max(end, at + len(data))
        if self._copying and end:
            replica.copied(header.offset, end)
        return b""

    def _fill(self, header: RequestHeader, payload: memoryview) -> bytes:
        """A clone's first contents for one chunk, written only if it never was."""
        replica = self._io_replica(header)
        written = replica.fill(header.offset, payload, header.generation)
        if written and self._copying:
            replica.copied(header.offset, len(payload))
        return encode_json({"written": written})

    def _share(self, header: RequestHeader, payload: memoryview) -> bytes:
        """Map the client's write buffers, a memory file on this host, read-only (see
        sharing.py for which).

        With the client's id (``client``): this is its only connection from now on. One it
        had before is aborted, so that no request left in it reads the buffers any more, and
        the answer says so (``alone``): the client may reuse the slots those requests named.
        """
        shared, sharer = map_offered(
            self._transport.get_extra_info("socket") if self._transport else None, payload)
        self._unshare()
        self._shared, self._shared_view = shared, memoryview(shared)
        if self._fast is not None:
            self._fast.share(self._shared_view)
        if not sharer:
            return b""
        self._sharer = sharer
        before = self._server.sharers.get(sharer)
        if before is not None and before is not self:
            before.abort()  # what it has not read yet is never read
        self._server.sharers[sharer] = self
        return encode_json({"alone": True})

    def _unshare(self) -> None:
        view, shared = self._shared_view, self._shared
        self._shared = self._shared_view = None
        if self._fast is not None:
            self._fast.unshare()
        if view is not None:
            view.release()
        if shared is not None:
            with contextlib.suppress(BufferError):  # a view still alive: unmapped when it dies
                shared.close()

    def _write_shared(self, header: RequestHeader, payload: memoryview) -> bytes:
        """A WRITE whose data lies in the client's shared buffers at the payload's u64."""
        replica = self._io_replica(header)
        view = self._shared_view
        if view is None:
            raise InvalidArgument(what="WRITE_SHARED", detail="no buffers shared (SHARE)")
        at = decode_u64(payload)
        if at + header.length > len(view):
            raise InvalidArgument(what="WRITE_SHARED",
                                  detail=f"{header.length} bytes at {at} exceed the "
                                         f"{len(view)} shared")
        replica.write(header.offset, view[at:at + header.length], header.generation)
        if self._fast is not None and not self._copying:
            self._allow_fast(header, replica)
        return b""

    def _trim(self, header: RequestHeader, payload: memoryview) -> bytes:
        self._io_replica(header).trim(header.offset, header.length, header.generation,
                                      every_chunk=payload == TRIM_COPY)
        return b""

    def _generations(self, header: RequestHeader, payload: memoryview) -> bytes:
        replica = self._store.replica(header.volume_id)
        if header.offset % CHUNK_SIZE:
            raise InvalidArgument(
                what="offset", detail=f"GENS offsets are multiples of the chunk size {CHUNK_SIZE}"
            )
        count = header.length or MAX_GENS_CHUNKS  # GENS counts chunks, not bytes
        return replica.generations(header.offset // CHUNK_SIZE, min(count, MAX_GENS_CHUNKS))

    def _fence(self, header: RequestHeader, payload: memoryview) -> bytes:
        if header.epoch == 0:
            raise InvalidArgument(what="epoch", detail="FENCE needs an epoch of at least 1")
        self._check_grant(header)
        self._store.replica(header.volume_id).fence(header.epoch)
        return b""

    def _flush(self, header: RequestHeader, payload: memoryview) -> object:
        return self._in_worker(header, _empty, self._io_replica(header).flush)

    def _snapshot(self, header: RequestHeader, payload: memoryview) -> object:
        """Keep the replica as it is now (after a flush: in a worker thread, like FLUSH;
        the volume's writer holds its writes meanwhile)."""
        replica = self._io_replica(header)
        body = decode_json(payload)
        if not isinstance(body, dict) or not isinstance(body.get("created"), int | float):
            raise InvalidArgument(what="payload", detail='SNAPSHOT needs {"id", "created"}')
        return self._in_worker(header, lambda info: encode_json(info.to_dict()),
                               replica.take_snapshot, str(body.get("id")),
                               float(body["created"]))

    def _snapshots(self, header: RequestHeader, payload: memoryview) -> bytes:
        replica = self._store.replica(header.volume_id)
        return encode_json([s.to_dict() for s in replica.snapshots()])

    def _delete_snapshot(self, header: RequestHeader, payload: memoryview) -> object:
        """Flush in a worker thread (the writer goes on meanwhile), then forget the
        snapshot here (its space is punched later, a little at a time: ``reclaim``)."""
        body = decode_json(payload)
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise InvalidArgument(what="payload", detail='SNAPSHOT_DELETE needs {"id"}')
        replica = self._io_replica(header)
        return self._in_worker(header, _empty, replica.flush, then=partial(
            self._flushed_for_delete, header, replica, body["id"]))

    def _flushed_for_delete(self, header: RequestHeader, replica: StoredReplica,
                            snapshot_id: str, done: asyncio.Future[Any]) -> None:
        self._server.flushes.discard(done)
        try:
            if done.cancelled():
                raise CargoholdError(detail="cancelled")
            if done.exception() is not None:
                raise done.exception()  # type: ignore[misc]
            body = encode_json({"freed": replica.delete_snapshot(snapshot_id)})
        except Exception as exc:
            status, text = error_response(exc, header, self._store, self._server.faults)
            self._queue(status, header.request_id, text)
        else:
            self._queue(Status.OK, header.request_id, body)
        self._send()

    def _read_snapshot(self, header: RequestHeader, payload: memoryview) -> bytes:
        body = decode_json(payload)
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise InvalidArgument(what="payload", detail='READ_SNAPSHOT needs {"id"}')
        if header.epoch == SNAPSHOT_READS:  # a snapshot never changes: no fencing
            self._check_grant(header)
            replica = self._store.replica(header.volume_id)
        else:
            replica = self._io_replica(header)
        if isinstance(body.get("blocks"), list):  # [[chunk, [block, ...]], ...]: a batch
            return chunkdelta.collect_batch(body["blocks"], lambda at, n: replica.read_snapshot(
                body["id"], at, n))
        if header.length > MAX_PAYLOAD:
            raise InvalidArgument(what="length", detail=f"reads are limited to {MAX_PAYLOAD}")
        return replica.read_snapshot(body["id"], header.offset, header.length)

    def _scrub_snapshots(self, header: RequestHeader, payload: memoryview) -> object:
        """Read every block the snapshots hold apart (in a worker thread)."""
        return self._in_worker(
            header, lambda bad: encode_json([{"snapshot": s, "offset": at} for s, at in bad]),
            self._io_replica(header).scrub_snapshots)

    def _repair_snapshot(self, header: RequestHeader, payload: memoryview) -> bytes:
        if len(payload) != 32 + header.length:
            raise InvalidArgument(what="payload", detail="SNAPSHOT_REPAIR takes the snapshot "
                                  "id (32 hex characters) and the block")
        snapshot_id = bytes(payload[:32]).decode("ascii", "replace")
        self._io_replica(header).repair_snapshot(snapshot_id, header.offset, payload[32:])
        return b""

    def _snapshot_diff(self, header: RequestHeader, payload: memoryview) -> bytes:
        body = decode_json(payload)
        if not isinstance(body, dict) or not all(
                isinstance(body.get(k, ""), str) for k in ("since", "until")):
            raise InvalidArgument(what="payload", detail='SNAPSHOT_DIFF needs {"since", '
                                  '"until"}: snapshot ids or ""')
        replica = self._store.replica(header.volume_id)
        since, until = body.get("since", ""), body.get("until", "")
        if body.get("blocks") is True:  # 4 KiB blocks rather than chunks
            return encode_json(replica.changed_blocks(since, until))
        return encode_json(replica.changed_chunks(since, until))

    def _revert(self, header: RequestHeader, payload: memoryview) -> object:
        """Put the replica back to a snapshot (reads and writes it all: in a worker
        thread; the volume is detached, its only user the one asking)."""
        body = decode_json(payload)
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise InvalidArgument(what="payload", detail='REVERT needs {"id"}')
        return self._in_worker(header, lambda changed: encode_json({"changed": changed}),
                               self._io_replica(header).revert, body["id"],
                               header.generation)

    def _in_worker(self, header: RequestHeader, encode: Callable[[Any], bytes],
                   work: Callable[..., Any], *args: Any,
                   then: Callable[[asyncio.Future[Any]], None] | None = None) -> object:
        """Run ``work(*args)`` in a worker thread (a flush, a snapshot, a revert: the
        event loop serves other requests meanwhile); answer with ``encode(result)``, or let
        ``then`` go on from its future. Shutdown waits for these (``flushes``)."""
        done = asyncio.get_running_loop().run_in_executor(None, work, *args)
        self._server.flushes.add(done)
        done.add_done_callback(then or partial(self._answered, header, encode))
        return _LATER

    def _answered(self, header: RequestHeader, encode: Callable[[Any], bytes],
                  done: asyncio.Future[Any]) -> None:
        self._server.flushes.discard(done)
        exc = done.exception() if not done.cancelled() else CargoholdError(detail="cancelled")
        if exc is None:
            self._queue(Status.OK, header.request_id, encode(done.result()))
        else:
            status, body = error_response(exc, header, self._store, self._server.faults)
            self._queue(status, header.request_id, body)
        self._send()


_HANDLERS: dict[int, Handler] = {
    Op.HELLO: _Connection._hello,
    Op.CREATE: _Connection._create,
    Op.DELETE: _Connection._delete,
    Op.STAT: _Connection._stat,
    Op.READ: _Connection._read,
    Op.WRITE: _Connection._write,
    Op.WRITE_BLOCKS: _Connection._write_blocks,
    Op.FLUSH: _Connection._flush,
    Op.TRIM: _Connection._trim,
    Op.GENS: _Connection._generations,
    Op.FENCE: _Connection._fence,
    Op.RESIZE: _Connection._resize,
    Op.SHARE: _Connection._share,
    Op.WRITE_SHARED: _Connection._write_shared,
    Op.AUTHORIZE: _Connection._authorize,
    Op.SNAPSHOT: _Connection._snapshot,
    Op.SNAPSHOTS: _Connection._snapshots,
    Op.SNAPSHOT_DELETE: _Connection._delete_snapshot,
    Op.READ_SNAPSHOT: _Connection._read_snapshot,
    Op.REVERT: _Connection._revert,
    Op.SNAPSHOT_DIFF: _Connection._snapshot_diff,
    Op.SNAPSHOT_SCRUB: _Connection._scrub_snapshots,
    Op.SNAPSHOT_REPAIR: _Connection._repair_snapshot,
    Op.FILL: _Connection._fill,
}


def _identity(transport: asyncio.BaseTransport, guard: Guard | None) -> str | None:
    """The node a connection comes from: its certificate's name over TLS, this host's
    node over the unix socket, unknown over plaintext TCP."""
    cert = transport.get_extra_info("peercert")
    if cert:
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return ""  # a certificate of the CA without a name: no capability matches it
    sock = transport.get_extra_info("socket")
    if guard is not None and sock is not None and sock.family == socket.AF_UNIX:
        return guard.node
    return None


#: Ops that write blocks anew: they repair a block found bad (``Faults``).
REWRITES = frozenset({Op.WRITE, Op.WRITE_SHARED, Op.FILL, Op.TRIM})


class DataProtocolServer:
    """A listening data server over a ``ChunkStore`` (see ``serve``)."""

    def __init__(self, store: ChunkStore, max_connections: int = MAX_CONNECTIONS,
                 frame_timeout: float = FRAME_TIMEOUT, tls: ssl.SSLContext | None = None,
                 guard: Guard | None = None) -> None:
        """``tls``: serve TCP with it (None: plaintext); ``guard``: ask for capabilities
        (None: any epoch, as in-process tests and benchmarks use it)."""
        self.store = store
        self.tls = tls
        self.guard = guard
        self.max_connections = max_connections
        self.frame_timeout = frame_timeout
        self.connections: set[_Connection] = set()
        self.flushes: set[asyncio.Future[Any]] = set()
        self.sharers: dict[str, _Connection] = {}  # who maps which client's buffers
        self._disk_reads: DiskReads | None = None
        self.faults = Faults()
        self.compiled_before = (0, 0)  # writes and reads the C served on closed connections
        self.host = ""
        self.port = 0
        self.socket_path: Path | None = None
        self._server: asyncio.Server | None = None
        self._writeback: asyncio.Task[None] | None = None
        self._unix_server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def compiled(self) -> tuple[int, int]:
        """Writes and reads served by the compiled path (fastio.py) since it started."""
        counts = [self.compiled_before, *(c.compiled() for c in self.connections)]
        return sum(w for w, _ in counts), sum(r for _, r in counts)

    @property
    def disk_reads(self) -> DiskReads:
        """Reads that would wait for the disk, done off the event loop."""
        if self._disk_reads is None:
            self._disk_reads = DiskReads(asyncio.get_running_loop(), READ_THREADS)
        return self._disk_reads

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, ssl=self.tls,
            ssl_handshake_timeout=self.frame_timeout if self.tls else None)
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("data server %s listening on %s (%s)", self.store.server_id, self.address,
                 "TLS" if self.tls else "PLAINTEXT: anyone who reaches the port is let in")
        if self._writeback is None:
            self._writeback = asyncio.ensure_future(
                Periodic("writeback", self.writeback_once, WRITEBACK_INTERVAL,
                         wait_first=True).run_forever())

    async def writeback_once(self) -> None:
        """Start writing the replicas with many small writes to disk (in a worker thread:
        starting writeback can wait for the disk's queue)."""
        self.store.refresh_space()
        written = [r for r in self.store.open_replicas() if r.small_writes >= WRITEBACK_AFTER]
        if written:
            await asyncio.to_thread(_start_writebacks, written)
        # space of deleted snapshots, punched a little each second (not in one storm)
        await asyncio.to_thread(_reclaim, self.store.open_replicas())

    async def listen_unix(self, path: Path) -> None:
        """Also serve on the unix socket ``path`` (for engines on this host).

        A path too long for a unix socket is skipped (clients then use TCP).
        """
        if len(os.fsencode(path)) >= 108:
            log.warning("not serving on %s: the path is too long for a unix socket", path)
            return
        path.unlink(missing_ok=True)  # left by a server that was killed
        loop = asyncio.get_running_loop()
        sock = unix_listener(str(path), 0o600)  # engines and the node run as root
        self._unix_server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        self.socket_path = path

    async def close(self) -> None:
        """Stop listening, let connections send their responses, wait for running flushes."""
        if self._writeback is not None:
            self._writeback.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writeback
        if self._server is not None:
            self._server.close()
        if self._unix_server is not None:
            self._unix_server.close()
            if self.socket_path is not None:
                self.socket_path.unlink(missing_ok=True)
        connections = list(self.connections)
        for connection in connections:
            connection.close()
        if connections:
            await asyncio.wait([c.lost for c in connections], timeout=_CLOSE_GRACE)
            for connection in connections:
                if not connection.lost.done():
                    connection.abort()
        if self._server is not None:
            await self._server.wait_closed()
        if self._unix_server is not None:
            await self._unix_server.wait_closed()
        if self.flushes:
            await asyncio.gather(*self.flushes, return_exceptions=True)
        if self._disk_reads is not None:
            self._disk_reads.close()


def _empty(_result: object) -> bytes:
    return b""


def _as_is(result: bytes) -> bytes:
    return result


def _start_writebacks(replicas: list[StoredReplica]) -> None:
    for replica in replicas:
        replica.start_writeback()


def _reclaim(replicas: list[StoredReplica]) -> None:
    for replica in replicas:
        replica.reclaim(RECLAIM_RUNS)


async def serve(store: ChunkStore, host: str, port: int) -> DataProtocolServer:
    """Serve ``store`` on ``host:port`` (0 picks a free port); close with ``close()``."""
    server = DataProtocolServer(store)
    await server.start(host, port)
    return server
