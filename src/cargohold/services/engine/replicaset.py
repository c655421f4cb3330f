"""The engine's data path: one volume's I/O fanned out to its replicas.

:class:`ReplicaSet` is the data path. Writes go to every in-sync replica at once and are
acknowledged when all of them answered; a replica that fails is recorded as out of sync in
the metadata store *before* the write is acknowledged, and is never read again by this
engine. Flushes (the file system's fsync, journal commits) reach every replica's
``fdatasync``. Nothing on the I/O path touches the metadata store unless a replica fails.

A replica that is out of sync catches up while the volume is in use (``catch_up``): it
joins as a *joining* member, which receives every new write, trim and flush but is never
read; the chunks it missed are copied to it one at a time, each under a chunk lock (writes
to that chunk wait, and the copy waits for the writes already in flight to it); then, with
writes paused for a moment, it is flushed, recorded in sync, and becomes a member.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cargohold.clients.access import Access
from cargohold.clients.dataclient import DataClient
from cargohold.clients.sharedmemory import SharedMemory
from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE, chunks, copy_plan, generation_table
from cargohold.core.models import DataServer, ServerState, Volume
from cargohold.core.wire import LOCAL_SOCKET, BytesLike
from cargohold.errors import (
    CargoholdError,
    ChecksumMismatch,
    DataServerUnavailable,
    Fenced,
    LeaseLost,
    NoReplicaLeft,
    NoSpace,
)
from cargohold.services import copies
from cargohold.services.copies import WINDOW, Budget, ScrubReport, put_copy, together
from cargohold.services.engine.fanin import FanIn, chain
from cargohold.services.engine.localreader import LocalReplicaReader

log = logging.getLogger(__name__)

MarkFailed = Callable[[str, str], Awaitable[None]]
Progress = Callable[[float], Awaitable[None]]
CONNECT_TIMEOUT = 2.0  # to a data server at attach
DOWN_CONNECT_TIMEOUT = 0.3  # to one the controller has marked down
STAT_TIMEOUT = 10.0
COPY_WINDOW = WINDOW  # chunks copied at once to a joining member, as in a resync


@dataclass
class Member:
    server: DataServer
    client: DataClient


class ReplicaSet:
    """Fans one volume's I/O out to its in-sync replicas."""

    def __init__(self, volume: Volume, servers: Mapping[str, DataServer], epoch: int,
                 local_node: str, mark_failed: MarkFailed,
                 shared: SharedMemory | None = None, access: Access | None = None) -> None:
        self.name = volume.name
        self._access = access  # TLS and this attachment's capability (None: in the clear)
        self._shared = shared  # write buffers offered to the data servers on this host
        self.volume_id = volume.id
        self.size = volume.size
        self.epoch = epoch
        self._wanted = [servers[r.server] for r in volume.in_sync() if r.server in servers]
        self._missing = [r.server for r in volume.in_sync() if r.server not in servers]
        self._wanted.sort(key=lambda s: s.node != local_node)  # local replicas are read first
        self._local_node = local_node
        self._mark_failed = mark_failed
        self._failing: dict[str, asyncio.Future[None]] = {}
        self.members: list[Member] = []
        # The first member's files when it is on this host: reads are served from them in
        # this process (``read_at_once``), without a round trip through its data server.
        self._reader: LocalReplicaReader | None = None
        self._reader_of: Member | None = None
        self._generation = epoch << 32
        self._trims = 0  # trims so far (read repair checks nothing changed under it)
        # Fenced (or the node's lease lost): every later I/O fails at once
        self.fenced: Fenced | LeaseLost | None = None
        # Catching up (see ``catch_up``). While a member joins, or writes are paused, every
        # write takes the careful path, which waits for the pause and for locked chunks and
        # counts its writes per chunk; the fast path only counts writes in flight.
        self.joining: list[Member] = []
        self._left_out: dict[str, str] = {}  # joining members that failed: server id → why
        self._scrubbing = False  # a scrub locks chunks too (``scrub``)
        self._careful = False
        self._inflight = 0
        self._idle: asyncio.Future[None] | None = None  # set when _inflight drops to 0
        self._paused: asyncio.Future[None] | None = None
        self._locked: dict[int, asyncio.Future[None]] = {}  # chunk → its copy is done
        self._chunk_inflight: dict[int, int] = {}
        self._chunk_idle: dict[int, asyncio.Future[None]] = {}
        self._catching_up = 0  # replicas catching up: cuts wait for them (``hold``)

    async def open(self) -> None:
        """Connect to every in-sync replica and claim it with this attachment's epoch."""
        for server_id in self._missing:
            await self._mark_failed(server_id, "data server is not registered")
        # All at once; a server the controller has marked down gets a short connect timeout
        # (a dead host does not refuse, it just never answers: no need to wait long for it).
        clients = [self.client_for(server) for server in self._wanted]
        results = await asyncio.gather(
            *(self._claim(client, DOWN_CONNECT_TIMEOUT if server.state is ServerState.DOWN
                          else CONNECT_TIMEOUT)
              for server, client in zip(self._wanted, clients, strict=True)),
            return_exceptions=True)
        # A replica that could not store the fence has lost nothing: say why, mark nothing.
        full = next((r for r in results if isinstance(r, NoSpace)), None)
        if full is not None:
            for client in clients:
                await client.close()
            raise full
        fenced = next((r for r in results if isinstance(r, Fenced)), None)
        for server, client, result in zip(self._wanted, clients, results, strict=True):
            if result is None and fenced is None:
                self.members.append(Member(server, client))
                continue
            await client.close()
            if isinstance(result, CargoholdError) and not isinstance(result, Fenced):
                await self._mark_failed(server.id, f"unreachable at attach: {result}")
            elif isinstance(result, BaseException) and not isinstance(result, Fenced):
                raise result
        if fenced is not None:
            await self.close()
            raise fenced
        if not self.members:
            raise NoReplicaLeft(name=self.name)
        copied = await self.reconcile()
        self._choose_reader()
        if copied:
            log.warning("%s: %d chunks differed among the in-sync replicas and were copied "
                        "from the newest", self.name, copied)

    def client_for(self, server: DataServer) -> DataClient:
        """A client for ``server``: over its unix socket (``LOCAL_SOCKET``) when it is on
        this host, else TCP."""
        local = None
        if server.node == self._local_node and server.path:
            local = os.path.join(server.path, LOCAL_SOCKET)
        return DataClient(server.address, server.id, local, self._shared, access=self._access,
                          peer=server.node)

    async def _claim(self, client: DataClient, timeout: float) -> None:
        await client.connect(timeout=timeout)
        await client.fence(self.volume_id, self.epoch)

    async def reconcile(self) -> int:
        """Make the in-sync replicas agree before the volume is used; return chunks copied.

        A writer that died with writes in flight can leave replicas that differ; those writes
        were never acknowledged, so any one version is right, but all replicas must hold the
        same one. Chunks whose generations differ are copied from the replica holding the
        newest generation, with that generation.
        """
        if len(self.members) < 2:
            return 0
        members = list(self.members)
        results = await asyncio.gather(*(m.client.generations(self.volume_id) for m in members),
                                       return_exceptions=True)
        tables: list[tuple[Member, array[int]]] = []
        for member, result in zip(members, results, strict=True):
            if isinstance(result, Fenced):
                raise result
            if isinstance(result, BaseException):
                await self._drop(member, f"reading generations failed: {result}")
            else:
                tables.append((member, generation_table(bytes(result))))
        if len(tables) < 2 or all(t.tobytes() == tables[0][1].tobytes() for _, t in tables):
            return 0
        count = min(len(t) for _, t in tables)
        copied = 0
        for chunk in range(count):
            gens = [t[chunk] for _, t in tables]
            newest = max(gens)
            if min(gens) == newest:
                continue
            source = tables[gens.index(newest)][0]
            offset = chunk * CHUNK_SIZE
            length = min(CHUNK_SIZE, self.size - offset)
            data = await source.client.read(self.volume_id, self.epoch, offset, length)
            stale = [m for (m, _), g in zip(tables, gens, strict=True) if g != newest]
            written = await asyncio.gather(
                *(put_copy(m.client, self.volume_id, self.epoch, offset, data, newest)
                  for m in stale), return_exceptions=True)
            await self._settle(stale, written, "reconcile")
            copied += 1
        return copied

    async def close(self) -> None:
        for member in self.members + self.joining:
            await member.client.close()
        self.members = []
        self.joining = []
        self._choose_reader()

    def _choose_reader(self) -> None:
        """Read the first member's files directly if it is on this host (after the members
        or the size changed); a replica whose files cannot be opened is read through its
        data server, as before."""
        first = self.members[0] if self.members else None
        reader = self._reader
        if first is self._reader_of and (reader is None or reader.size >= self.size):
            return
        if reader is not None:
            reader.close()
        self._reader, self._reader_of = None, first
        if first is None or first.server.node != self._local_node or not first.server.path:
            return
        try:
            self._reader = LocalReplicaReader(Path(first.server.path), self.volume_id,
                                              self.epoch)
        except (OSError, CargoholdError) as e:
            log.warning("%s: reading the local replica through its data server: %s",
                        self.name, e)

    async def grow(self, size: int) -> bool:
        """Address ``size`` bytes from now on, once every replica is known to be that big.

        The volume service grows the replicas before it records a new size, so this only
        checks (STAT); a replica that is smaller, or does not answer, leaves the size as it
        is (returns False) rather than making later writes beyond its end fail.
        """
        if size <= self.size:
            return size == self.size
        members = list(self.members)
        results = await asyncio.gather(*(m.client.stat(self.volume_id, timeout=STAT_TIMEOUT)
                                         for m in members), return_exceptions=True)
        for member, result in zip(members, results, strict=True):
            if isinstance(result, BaseException):
                log.error("%s: not growing to %d bytes: replica on %s did not answer: %s",
                          self.name, size, member.server.id, result)
                return False
            if int(result.get("size", 0)) < size:
                log.error("%s: not growing to %d bytes: replica on %s is %s bytes", self.name,
                          size, member.server.id, result.get("size"))
                return False
        log.info("%s: grew from %d to %d bytes", self.name, self.size, size)
        self.size = size
        self._choose_reader()
        return True

    # -- catching up ---------------------------------------------------------------------

    def holds(self, server_id: str) -> bool:
        """Whether a member or a joining member lives on data server ``server_id``."""
        return any(m.server.id == server_id for m in self.members + self.joining)

    async def retire(self, in_sync: set[str]) -> None:
        """Stop using members the volume record no longer lists as in sync (the controller
        dropped a replica that was replaced, after its replacement caught up)."""
        for member in [m for m in self.members if m.server.id not in in_sync]:
            if len(self.members) < 2:
                return
            log.info("%s: replica on data server %s is no longer in the volume's in-sync set; "
                     "leaving it", self.name, member.server.id)
            self.members.remove(member)
            self._choose_reader()
            await member.client.close()

    async def catch_up(self, server: DataServer, begin: Callable[[], Awaitable[None]],
                       promote: Callable[[], Awaitable[None]], progress: Progress,
                       rate: float = 0.0) -> tuple[int, int]:
        """Bring the replica on ``server`` level with the members while the volume is in use,
        then make it a member; return (chunks copied, chunks in the volume).

        ``begin`` records that it is catching up, once its data server has answered (an
        unreachable one changes nothing). ``promote`` records it in sync; it runs while
        writes are paused, after the replica has flushed. ``progress`` gets the fraction
        copied about once a second. Sources are the members, taken in turn. On failure the
        replica is left out (never read, no I/O fails) and the error is raised.
        """
        self._check_fenced()
        if not self.members:
            raise NoReplicaLeft(name=self.name)  # nothing to copy from
        member = Member(server, self.client_for(server))
        counted = False  # in _catching_up (cuts wait for it)
        client = member.client
        try:
            await client.connect(timeout=CONNECT_TIMEOUT)
            await client.fence(self.volume_id, self.epoch, timeout=STAT_TIMEOUT)
            size = int((await client.stat(self.volume_id, timeout=STAT_TIMEOUT)).get("size", 0))
            if size < self.size:
                await client.resize(self.volume_id, self.size, timeout=STAT_TIMEOUT)
            # Its snapshots first, from a member (snapshots do not change: no write of
            # ours touches them); no snapshot is cut until it has joined and caught up.
            self._catching_up += 1
            counted = True
            await copies.replay_snapshots(self.members[0].client, client, self.volume_id,
                                          self.epoch, self.size)
            # Its generations before it gets any write: a chunk that differs from the
            # members' then is copied whole, even if new writes touch part of it meanwhile.
            before = generation_table(await client.generations(self.volume_id,
                                                               timeout=STAT_TIMEOUT))
            await begin()
            await self._pause()
            try:
                self._left_out.pop(server.id, None)
                self.joining.append(member)
            finally:
                self._resume()
            sources = list(self.members)
            if not sources:
                raise NoReplicaLeft(name=self.name)
            now = generation_table(await sources[0].client.generations(self.volume_id,
                                                                       timeout=STAT_TIMEOUT))
            plan = copy_plan(self.size, {"members": now}, {"joining": before})
            budget = Budget(rate)
            copied = 0
            reported = asyncio.get_running_loop().time()
            pending = iter(plan)

            async def copier(turn: int) -> None:
                nonlocal copied, reported
                for chunk, _, generation, _ in pending:
                    self._still_joining(member)
                    source = sources[(turn + chunk) % len(sources)]
                    length = await self._copy_chunk(chunk, source, member, generation)
                    copied += 1
                    await budget.spend(length)
                    now = asyncio.get_running_loop().time()
                    if now - reported >= 1.0:
                        reported = now
                        await progress(copied / len(plan))

            await together([copier(turn) for turn in range(COPY_WINDOW)])
            await self._pause()
            try:
                self._still_joining(member)
                await client.flush(self.volume_id, self.epoch)
                await promote()
                self.joining.remove(member)
                if server.node == self._local_node:
                    self.members.insert(0, member)  # local replicas are read first
                else:
                    self.members.append(member)
                self._choose_reader()
                self._failing.pop(server.id, None)  # it may fail (and be dropped) again
            finally:
                self._resume()
            log.info("%s: replica on data server %s caught up: %d of %d chunks copied",
                     self.name, server.id, copied, -(-self.size // CHUNK_SIZE))
            return copied, -(-self.size // CHUNK_SIZE)
        except BaseException as e:
            if member in self.joining:
                self._leave_out(member, f"catching up failed: {e}")
            await client.close()
            raise
        finally:
            if counted:
                self._catching_up -= 1

    def _still_joining(self, member: Member) -> None:
        if self.fenced is not None:
            raise self.fenced
        if member not in self.joining:
            raise DataServerUnavailable(
                server=member.server.id, address=member.server.address,
                detail=self._left_out.get(member.server.id, "left out while catching up"))

    def _leave_out(self, member: Member, reason: str) -> None:
        if member in self.joining:
            log.error("%s: replica on data server %s stops catching up: %s", self.name,
                      member.server.id, reason)
            self.joining.remove(member)
            self._left_out[member.server.id] = reason
            self._update_careful()

    def _update_careful(self) -> None:
        self._careful = bool(self.joining) or self._scrubbing or self._paused is not None

    async def _copy_chunk(self, chunk: int, source: Member, member: Member,
                          generation: int) -> int:
        """Copy one chunk from ``source`` (another member if it fails) to a joining member,
        with writes to that chunk held back meanwhile; return the bytes copied."""
        offset = chunk * CHUNK_SIZE
        length = min(CHUNK_SIZE, self.size - offset)
        async with self._chunk_lock(chunk):
            data: BytesLike
            try:
                data = await source.client.read(self.volume_id, self.epoch, offset, length)
            except CargoholdError as e:
                if isinstance(e, Fenced):
                    self._fence(e)
                    raise
                data = await self._read_slowly(offset, length, source, e)
            await put_copy(member.client, self.volume_id, self.epoch, offset, data, generation)
        return length

    @contextlib.asynccontextmanager
    async def _chunk_lock(self, chunk: int) -> AsyncIterator[None]:
        """Hold back new writes and trims to ``chunk`` and wait for those in flight to it to
        land (needs ``_careful``: writes counted per chunk)."""
        loop = asyncio.get_running_loop()
        while chunk in self._locked:  # one holder at a time
            await asyncio.shield(self._locked[chunk])
        lock: asyncio.Future[None] = loop.create_future()
        self._locked[chunk] = lock
        try:
            while self._chunk_inflight.get(chunk):
                waiter = self._chunk_idle.get(chunk)
                if waiter is None:
                    waiter = self._chunk_idle[chunk] = loop.create_future()
                await asyncio.shield(waiter)
            yield
        finally:
            del self._locked[chunk]
            lock.set_result(None)

    async def scrub(self, rate: float = 0.0) -> ScrubReport:
        """Read every written chunk from every member while the volume is in use; a copy
        whose checksum fails is rewritten from a clean one. Each chunk is locked while it is
        read and repaired, so no write of the application races the repair."""
        started = asyncio.get_running_loop().time()
        report = ScrubReport(self.name)
        members = list(self.members)
        tables = [generation_table(await m.client.generations(self.volume_id,
                                                             timeout=STAT_TIMEOUT))
                  for m in members]
        await self._pause()  # from here on every write is counted per chunk
        self._scrubbing = True
        self._resume()
        budget = Budget(rate)
        try:
            for chunk in range(-(-self.size // CHUNK_SIZE)):
                newest = max((t[chunk] if chunk < len(t) else 0 for t in tables), default=0)
                if not newest:
                    continue  # never written: thin, nothing to read
                report.chunks += 1
                length = await self._scrub_chunk(
                    chunk, newest, [m for m in members if m in self.members], report)
                await budget.spend(length)
        finally:
            self._scrubbing = False
            self._update_careful()
        await copies.scrub_snapshots({m.server.id: m.client for m in self.members},
                                     self.volume_id, self.epoch, report)
        report.skipped += [m.server.id for m in members if m not in self.members]
        report.seconds = round(asyncio.get_running_loop().time() - started, 3)
        return report

    async def _scrub_chunk(self, chunk: int, generation: int, members: list[Member],
                           report: ScrubReport) -> int:
        """Read ``chunk`` from every member; rewrite bad copies with ``generation`` (the
        chunk's, which every member holds: writes reach all of them)."""
        offset = chunk * CHUNK_SIZE
        length = min(CHUNK_SIZE, self.size - offset)
        async with self._chunk_lock(chunk):
            good: BytesLike | None = None
            bad = []
            for member in members:
                try:
                    data = await member.client.read(self.volume_id, self.epoch, offset, length)
                except Fenced as e:
                    self._fence(e)
                    raise
                except ChecksumMismatch as e:
                    log.error("scrub of %s: %s", self.name, e)
                    bad.append(member)
                    continue
                except CargoholdError as e:
                    await self._drop(member, f"scrub read failed: {e}")
                    continue
                report.bytes_read += length
                if good is None:
                    good = data
            if bad and good is None:
                report.lost.append(chunk)
                return length
            if bad:
                assert good is not None
                results = await asyncio.gather(
                    *(m.client.write(self.volume_id, self.epoch, offset, good, generation)
                      for m in bad), return_exceptions=True)
                await self._settle(bad, results, "scrub repair")
                report.repaired.extend({"chunk": chunk, "server": m.server.id} for m in bad
                                       if m in self.members)
        return length

    async def _pause(self) -> None:
        """Hold back new writes and trims, and wait for those in flight to land."""
        while self._paused is not None:  # one pause at a time
            await asyncio.shield(self._paused)
        self._paused = asyncio.get_running_loop().create_future()
        self._careful = True
        while self._inflight:
            self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)
        self._idle = None

    def _resume(self) -> None:
        paused, self._paused = self._paused, None
        self._update_careful()
        if paused is not None and not paused.done():
            paused.set_result(None)

    # -- the data path -------------------------------------------------------------------

    def _check_fenced(self) -> None:
        if self.fenced is not None:
            raise self.fenced

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    async def read(self, offset: int, length: int) -> BytesLike:
        return await self.start_read(offset, length)

    def read_at_once(self, offset: int, length: int, into: memoryview | None = None
                     ) -> BytesLike | None:
        """The bytes at ``offset`` from the local replica's files, if it can vouch for them
        now (see ``LocalReplicaReader``; ``into``: read them there); None: ``start_read``."""
        reader = self._reader
        if reader is None or self.fenced is not None or (offset | length) % BLOCK_SIZE:
            return None
        return reader.read(offset, length, into)

    def start_read(self, offset: int, length: int) -> asyncio.Future[BytesLike]:
        """Read from the first replica that answers (local ones first), as a future.

        The common case (aligned, the first replica answers) runs on the data client's
        response future alone: no coroutine or task per request. Anything else (unaligned I/O,
        a failing replica) continues in a task (``_read_slowly``).
        """
        members = self.members
        if (self.fenced is None and members and not offset % BLOCK_SIZE
                and not length % BLOCK_SIZE):
            member = members[0]
            reply = member.client.start_read(self.volume_id, self.epoch, offset, length)
            done: asyncio.Future[BytesLike] = reply.get_loop().create_future()
            reply.add_done_callback(partial(self._read_answered, done, member, offset, length))
            return done
        return asyncio.ensure_future(self._read_slowly(offset, length, None, None))

    def _read_answered(self, done: asyncio.Future[BytesLike], member: Member, offset: int,
                       length: int, reply: asyncio.Future[bytes | memoryview]) -> None:
        if done.cancelled():
            return
        error = reply.exception() if not reply.cancelled() else asyncio.CancelledError()
        if error is None:
            done.set_result(reply.result())
            return
        chain(asyncio.ensure_future(self._read_slowly(offset, length, member, error)), done)

    async def _read_slowly(self, offset: int, length: int, tried: Member | None,
                           error: BaseException | None) -> BytesLike:
        """Read, going over to the next replica on failure; ``tried`` already gave ``error``."""
        self._check_fenced()
        if offset % BLOCK_SIZE or length % BLOCK_SIZE:
            start = offset - offset % BLOCK_SIZE
            end = -(-(offset + length) // BLOCK_SIZE) * BLOCK_SIZE
            data = await self._read_slowly(start, end - start, None, None)
            return data[offset - start:offset - start + length]
        changes = (self._generation, self._trims)  # to tell whether anything wrote since
        bad: list[Member] = []
        for member in list(self.members):
            try:
                if member is tried and error is not None:
                    raise error
                data = await member.client.read(self.volume_id, self.epoch, offset, length)
            except Fenced as e:
                self._fence(e)
                raise
            except ChecksumMismatch as e:
                log.error("%s; reading another replica", e)
                bad.append(member)
                continue
            except CargoholdError as e:
                await self._drop(member, f"read failed: {e}")
                continue
            if bad:
                await self._repair(bad, offset, data, changes)
            return data
        raise NoReplicaLeft(name=self.name)

    async def _repair(self, bad: list[Member], offset: int, data: bytes,
                      changes: tuple[int, int]) -> None:
        """Rewrite copies whose checksum failed with ``data`` read from a good one, unless a
        write or trim came since the read began (it might touch the same blocks: then the
        scrub repairs the copy later, and the read has its answer anyway)."""
        if (self._generation, self._trims) != changes:
            log.warning("not repairing %d bytes at %d now: the volume was written meanwhile",
                        len(data), offset)
            return
        generation = self._next_generation()
        members = [m for m in bad if m in self.members]
        results = await asyncio.gather(
            *(m.client.write(self.volume_id, self.epoch, offset, data, generation)
              for m in members), return_exceptions=True)
        await self._settle(members, results, "repair")
        for member in members:
            log.warning("repaired %d bytes at offset %d on data server %s from a good copy",
                        len(data), offset, member.server.id)

    async def write(self, offset: int, data: BytesLike) -> None:
        await self.start_write(offset, data)

    def start_write(self, offset: int, data: BytesLike, shared_at: int = -1
                    ) -> asyncio.Future[None]:
        """Write to every in-sync replica; the future resolves once all acknowledged.

        The common case (aligned, every replica answers OK, no replica being marked out of
        sync) sends to every replica at once and completes from their response futures: no
        coroutine or task per request. A failure continues in a task (``_settle``) that
        records the failed replica in the metadata store before the write completes.
        ``shared_at``: where ``data`` lies in the shared write buffers, if it does (the
        data servers on this host then read it from there); the slow path sends the bytes.
        """
        if (self._careful or self.fenced is not None or offset % BLOCK_SIZE
                or len(data) % BLOCK_SIZE):
            return asyncio.ensure_future(self._write_slowly(offset, data))
        generation = self._next_generation()
        members = list(self.members)
        replies = [m.client.start_write(self.volume_id, self.epoch, offset, data, generation,
                                        shared_at) for m in members]
        if not replies:
            return asyncio.ensure_future(self._settle([], [], "write"))
        done: asyncio.Future[None] = replies[0].get_loop().create_future()
        self._inflight += 1
        FanIn(self, done, members, replies, "write", None)
        return done

    async def _write_slowly(self, offset: int, data: BytesLike) -> None:
        self._check_fenced()
        if offset % BLOCK_SIZE or len(data) % BLOCK_SIZE:
            await self._write_unaligned(offset, data)
            return
        if not self._careful:
            await self.start_write(offset, data)
            return
        counted = await self._enter(chunks(offset, len(data)))
        generation = self._next_generation()
        members = self.members + self.joining
        replies = [m.client.start_write(self.volume_id, self.epoch, offset, data, generation)
                   for m in members]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not replies:
            self._landed(counted)
            await self._settle([], [], "write")
        FanIn(self, done, members, replies, "write", counted)
        await done

    async def _enter(self, touched: range) -> range | None:
        """Wait until writes may go to ``touched`` chunks (no pause, none being copied), then
        count one more write in flight; returns the chunks counted (None: not counted per
        chunk, nobody is joining). ``_landed`` undoes it."""
        while True:
            if self._paused is not None:
                await asyncio.shield(self._paused)
                continue
            lock = next((self._locked[c] for c in touched if c in self._locked), None)
            if lock is None:
                break
            await asyncio.shield(lock)
        self._check_fenced()
        self._inflight += 1
        if not self.joining and not self._scrubbing:
            return None
        for chunk in touched:
            self._chunk_inflight[chunk] = self._chunk_inflight.get(chunk, 0) + 1
        return touched

    def _landed(self, counted: range | None) -> None:
        """Every replica answered a write or trim (counted by ``_enter`` or the fast path)."""
        self._inflight -= 1
        if not self._inflight and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        if counted is None:
            return
        for chunk in counted:
            left = self._chunk_inflight[chunk] - 1
            if left:
                self._chunk_inflight[chunk] = left
                continue
            del self._chunk_inflight[chunk]
            waiter = self._chunk_idle.pop(chunk, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def flush(self) -> None:
        self._check_fenced()
        members = self.members + self.joining
        results = await asyncio.gather(
            *(m.client.flush(self.volume_id, self.epoch) for m in members),
            return_exceptions=True,
        )
        await self._settle(members, results, "flush")

    async def hold(self) -> None:
        """Hold new writes and trims once those in flight have landed, and once no replica
        is catching up (it would miss what is cut now): a write barrier, ``release`` ends
        it."""
        self._check_fenced()
        while self._catching_up:
            await asyncio.sleep(0.05)
            self._check_fenced()
        await self._pause()

    def release(self) -> None:
        self._resume()

    async def cut(self, snapshot_id: str, created: float) -> list[str]:
        """Take snapshot ``snapshot_id`` on every member, writes held (``hold``); return
        the data servers that keep it. One that fails it fails the snapshot: the others
        forget theirs and the error is raised."""
        self._check_fenced()
        members = list(self.members)
        results = await asyncio.gather(
            *(m.client.snapshot(self.volume_id, self.epoch, snapshot_id, created)
              for m in members), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            if isinstance(failed, Fenced):
                self._fence(failed)
            await asyncio.gather(
                *(m.client.delete_snapshot(self.volume_id, self.epoch, snapshot_id)
                  for m, r in zip(members, results, strict=True)
                  if not isinstance(r, BaseException)), return_exceptions=True)
            raise failed
        return [m.server.id for m in members]

    async def trim(self, offset: int, length: int) -> None:
        self._check_fenced()
        self._trims += 1
        start = -(-offset // BLOCK_SIZE) * BLOCK_SIZE  # only whole blocks become holes
        end = (offset + length) // BLOCK_SIZE * BLOCK_SIZE
        if end <= start:
            return
        counted = await self._enter(chunks(start, end - start))
        try:
            # A trim changes what the chunks read, like a write: it takes a generation, so
            # that a replica that missed it is caught up (before, it kept the old bytes).
            generation = self._next_generation()
            members = self.members + self.joining
            results = await asyncio.gather(
                *(m.client.trim(self.volume_id, self.epoch, start, end - start, generation)
                  for m in members),
                return_exceptions=True,
            )
        finally:
            self._landed(counted)
        await self._settle(members, results, "trim")

    async def _write_unaligned(self, offset: int, data: BytesLike) -> None:
        start = offset - offset % BLOCK_SIZE
        end = -(-(offset + len(data)) // BLOCK_SIZE) * BLOCK_SIZE
        block = bytearray(await self.read(start, end - start))
        block[offset - start:offset - start + len(data)] = data
        await self.write(start, bytes(block))

    def _marking(self) -> bool:
        """Whether a failed replica is still being recorded in the metadata store."""
        return any(not pending.done() for pending in self._failing.values())

    async def _settle(self, members: list[Member], results: Sequence[object], what: str) -> None:
        """Drop the replicas that failed (recording it first); raise if the I/O failed."""
        if isinstance(self.fenced, LeaseLost):
            raise self.fenced
        for member, result in zip(members, results, strict=True):
            if isinstance(result, Fenced):
                self._fence(result)
                raise result
            if member in self.joining:  # not in sync yet: its failure fails no I/O
                if isinstance(result, BaseException):
                    self._leave_out(member, f"{what} failed: {result}")
                continue
            if isinstance(result, NoSpace):
                raise result
            if isinstance(result, BaseException):
                await self._drop(member, f"{what} failed: {result}")
        if not self.members:
            raise NoReplicaLeft(name=self.name)
        # A replica dropped by another request may have missed this one too: it must be
        # recorded as out of sync before this I/O is acknowledged.
        for pending in [p for p in self._failing.values() if not p.done()]:
            await asyncio.shield(pending)

    def lose_lease(self, error: LeaseLost) -> None:
        """The node lost its lease: another host may own the volume now. Every I/O fails
        from now on, those waiting on a data server too (their connections are cut: a host
        cut off would otherwise hold them until the network returns), and no replica is
        recorded as failed (that is not what happened, and the store may be out of reach)."""
        if self.fenced is None:
            log.error("%s; refusing all I/O on %s", error, self.name)
            self.fenced = error
        for member in self.members + self.joining:
            member.client.abort()

    def _fence(self, error: Fenced) -> None:
        if self.fenced is None:
            log.error("fenced: volume %s is attached elsewhere now (%s); refusing all I/O",
                      self.name, error)
            self.fenced = error

    async def _drop(self, member: Member, reason: str) -> None:
        """Take a replica out of the set; returns once the metadata store knows."""
        if isinstance(self.fenced, LeaseLost):
            raise self.fenced  # its connection was cut on purpose: it did not fail
        server_id = member.server.id
        pending = self._failing.get(server_id)
        if pending is None:
            log.error("replica on data server %s leaves the in-sync set: %s", server_id, reason)
            if member in self.members:
                self.members.remove(member)
                self._choose_reader()
            pending = asyncio.ensure_future(self._mark_failed(server_id, reason))
            self._failing[server_id] = pending
            pending.add_done_callback(lambda _: asyncio.ensure_future(member.client.close()))
        await asyncio.shield(pending)
