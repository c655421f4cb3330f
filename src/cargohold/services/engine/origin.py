"""A clone's engine while the clone fills: chunks its replicas lack come from the source.

A clone is writable the moment it exists. Until its replicas hold all of its source
snapshot, its engine knows the *absent* chunks: those the snapshot holds data in that its
replicas never wrote (generation 0, asked when the engine starts; the in-sync replicas agree
by then, see ``ReplicaSet.reconcile``). A read of an absent chunk goes to a data server that
keeps the snapshot (READ_SNAPSHOT under a snapshot-reads capability: it fences nobody). The
first write or trim to an absent chunk copies the chunk in, merged with the write, as one
write under a lock of that chunk; from then on the chunk is the replicas' own, and every
later request passes straight through. The controller fills the other chunks meanwhile with
FILL, which writes only chunks never written, so it can neither undo a write of ours nor
be undone by one. Every ``REFRESH`` seconds (and when the source cannot be read) the engine
asks its replicas which absent chunks they hold by now; once none is left, the source is
let go and the clone depends on nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cargohold.clients.dataclient import DataClient
from cargohold.core.capability import SNAPSHOT_READS
from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE, chunks, split
from cargohold.core.models import Origin, server_up
from cargohold.core.wire import BytesLike
from cargohold.errors import CargoholdError, SnapshotFailed
from cargohold.services.engine.replicaset import ReplicaSet
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

#: Seconds between asking the replicas which absent chunks were filled.
REFRESH = 2.0


class SnapshotSource:
    """Reads one snapshot from the first data server keeping it that answers."""

    def __init__(self, catalog: Catalog, origin: Origin, replicas: ReplicaSet) -> None:
        self.catalog = catalog
        self.origin = origin
        self._replicas = replicas  # makes the clients (TLS, the engine's capabilities)
        self._clients: list[DataClient] = []

    async def open(self) -> list[int]:
        """Connect to the data servers that keep the snapshot; return the chunks it holds
        data in."""
        snapshot = await self.catalog.snapshot(self.origin.volume, self.origin.snapshot)
        servers = {s.id: s for s in await self.catalog.servers()}
        holders = [servers[sid] for sid in snapshot.servers if server_up(servers.get(sid))]
        problems = []
        for server in holders:
            client = self._replicas.client_for(server)
            try:
                await client.connect()
                held = await client.snapshot_diff(self.origin.volume_id, "",
                                                  self.origin.snapshot_id)
            except CargoholdError as e:
                problems.append(f"{server.id}: {e}")
                await client.close()
                continue
            self._clients.append(client)
            if len(self._clients) == 1:
                found = held
        if not self._clients:
            raise SnapshotFailed(name=self.origin.ref, detail="no data server that keeps it "
                                 f"answers: {'; '.join(problems) or 'none is up'}")
        return found

    async def read(self, offset: int, length: int) -> bytes:
        """The snapshot's bytes at ``[offset, offset+length)``, zeros beyond its size."""
        inside = max(0, min(length, self.origin.size - offset))
        if not inside:
            return bytes(length)
        start = offset - offset % BLOCK_SIZE
        end = -(-(offset + inside) // BLOCK_SIZE) * BLOCK_SIZE
        problems = []
        for client in list(self._clients):
            try:
                data = await client.read_snapshot(self.origin.volume_id, SNAPSHOT_READS,
                                                  self.origin.snapshot_id, start, end - start)
            except CargoholdError as e:
                problems.append(f"{client.address}: {e}")
                continue
            piece = bytes(memoryview(data)[offset - start:offset - start + inside])
            return piece + bytes(length - inside)
        raise SnapshotFailed(name=self.origin.ref, detail="reading it failed everywhere: "
                             + "; ".join(problems))

    async def close(self) -> None:
        clients, self._clients = self._clients, []
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


class OriginTarget:
    """A ``BlockTarget`` over the replica set that takes absent chunks from the source."""

    def __init__(self, inner: ReplicaSet, source: SnapshotSource, absent: set[int],
                 held: set[int] | None = None) -> None:
        """``held``: every chunk the source holds data in (``absent``: those the replicas
        lack)."""
        self.inner = inner
        self.catalog = source.catalog
        self.source: SnapshotSource | None = source
        self.origin = source.origin
        self.held = held if held is not None else set(absent)
        self.absent = absent
        self._locks: dict[int, asyncio.Lock] = {}

    @classmethod
    async def open(cls, catalog: Catalog, origin: Origin, inner: ReplicaSet) -> OriginTarget:
        source = SnapshotSource(catalog, origin, inner)
        held = await source.open()
        try:
            generations = await inner.members[0].client.generations(inner.volume_id)
        except BaseException:
            await source.close()
            raise
        inside = {c for c in held if c * CHUNK_SIZE < min(origin.size, inner.size)}
        absent = {c for c in inside if generations[c * 8:c * 8 + 8] in (b"", bytes(8))}
        log.info("%s: %d chunks still come from %s", inner.name, len(absent), origin.ref)
        target = cls(inner, source, absent, inside)
        if not absent:
            await target._let_go()
        return target

    @property
    def size(self) -> int:
        return self.inner.size

    def _touches_absent(self, offset: int, length: int) -> bool:
        return bool(self.absent) and any(c in self.absent for c in chunks(offset, length))

    def read_at_once(self, offset: int, length: int, into: memoryview | None = None
                     ) -> BytesLike | None:
        if self._touches_absent(offset, length):
            return None
        return self.inner.read_at_once(offset, length, into)

    def start_read(self, offset: int, length: int) -> asyncio.Future[BytesLike]:
        if not self._touches_absent(offset, length):
            return self.inner.start_read(offset, length)
        return asyncio.ensure_future(self._read(offset, length))

    async def _read(self, offset: int, length: int) -> BytesLike:
        parts = await asyncio.gather(*(
            self._from_source(e.offset, e.length) if e.chunk in self.absent
            else self.inner.read(e.offset, e.length) for e in split(offset, length)))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _from_source(self, offset: int, length: int) -> BytesLike:
        source = self.source
        if source is not None:
            try:
                return await source.read(offset, length)
            except SnapshotFailed as e:
                await self.refresh()  # filled by now and the snapshot gone?
                if offset // CHUNK_SIZE in self.absent:
                    raise
                log.info("%s: %s; the replicas hold the chunk by now", self.inner.name, e)
        return await self.inner.read(offset, length)

    def start_write(self, offset: int, data: BytesLike, shared_at: int = -1
                    ) -> asyncio.Future[None]:
        if not self._touches_absent(offset, len(data)):
            return self.inner.start_write(offset, data, shared_at)
        return asyncio.ensure_future(self._write(offset, data))

    async def _write(self, offset: int, data: BytesLike) -> None:
        view = memoryview(data).cast("B")
        await asyncio.gather(*(
            self._write_in(e.chunk, e.offset, view[e.buffer_offset:e.buffer_offset + e.length])
            for e in split(offset, len(view))))

    async def _write_in(self, chunk: int, offset: int, piece: BytesLike) -> None:
        """Write ``piece`` into ``chunk``; an absent chunk is copied in with it first."""
        if chunk not in self.absent:
            await self.inner.write(offset, piece)
            return
        async with self._lock(chunk):
            if chunk not in self.absent:  # copied in while we waited
                await self.inner.write(offset, piece)
                return
            start = chunk * CHUNK_SIZE
            end = min(start + CHUNK_SIZE, self.inner.size)
            if offset == start and len(piece) == end - start:
                merged: BytesLike = piece
            else:
                whole = bytearray(await self._from_source(start, end - start))
                whole[offset - start:offset - start + len(piece)] = piece
                merged = whole
            await self.inner.write(start, merged)
            self.absent.discard(chunk)

    @asynccontextmanager
    async def _lock(self, chunk: int) -> AsyncIterator[None]:
        lock = self._locks.setdefault(chunk, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._locks.get(chunk) is lock:
                del self._locks[chunk]

    async def flush(self) -> None:
        await self.inner.flush()

    async def trim(self, offset: int, length: int) -> None:
        for chunk in chunks(offset, length):
            if chunk in self.absent:  # what the trim leaves of it must be the source's
                await self._write_in(chunk, chunk * CHUNK_SIZE, b"")
        await self.inner.trim(offset, length)

    async def refresh(self) -> None:
        """Drop the absent chunks every replica holds by now (the controller filled
        them); with none left, let the source go."""
        if not self.absent:
            return
        members = list(self.inner.members)
        if not members:
            return
        try:
            tables = await asyncio.gather(*(m.client.generations(self.inner.volume_id)
                                            for m in members))
        except CargoholdError as e:
            log.warning("%s: could not ask the replicas what was filled: %s",
                        self.inner.name, e)
            return
        filled = {c for c in self.absent
                  if all(t[c * 8:c * 8 + 8] not in (b"", bytes(8)) for t in tables)}
        self.absent -= filled
        if not self.absent:
            await self._let_go()

    async def joining(self, server_id: str) -> None:
        """A replica caught up and is about to be read (writes are held): the chunks the
        source holds that it never got (filled on the others after its copy began; none
        of ours, which it got too) are read from the source again until it has them."""
        member = next((m for m in self.inner.joining if m.server.id == server_id), None)
        if member is None:
            return
        table = await member.client.generations(self.inner.volume_id)
        lacking = {c for c in self.held if table[c * 8:c * 8 + 8] in (b"", bytes(8))}
        if not lacking - self.absent:
            return
        if self.source is None:  # let go already: take it again (raises if it is gone)
            source = SnapshotSource(self.catalog, self.origin, self.inner)
            await source.open()
            self.source = source
        log.info("%s: the replica on %s lacks %d chunks of %s: read from there until filled",
                 self.inner.name, server_id, len(lacking - self.absent), self.origin.ref)
        self.absent |= lacking

    async def _let_go(self) -> None:
        source, self.source = self.source, None
        if source is not None:
            log.info("%s: every chunk of %s is in the replicas now", self.inner.name,
                     source.origin.ref)
            await source.close()

    async def close(self) -> None:
        await self._let_go()
