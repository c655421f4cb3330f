"""The engine: one process per attached volume, serving it through FUSE to a loop device.

:class:`ReplicaSet` is the data path. Writes go to every in-sync replica at once and are
acknowledged when all of them answered; a replica that fails is recorded as out of sync in
the metadata store *before* the write is acknowledged, and is never read again by this
engine. Flushes (the file system's fsync, journal commits) reach every replica's
``fdatasync``. Nothing on the I/O path touches the metadata store unless a replica fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from array import array
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import uvloop

from cargohold.clients.dataclient import DataClient
from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE
from cargohold.core.models import DataServer, ReplicaState, ServerState, Volume
from cargohold.core.wire import LOCAL_SOCKET, BytesLike
from cargohold.errors import (
    CargoholdError,
    ChecksumMismatch,
    Fenced,
    MetadataUnavailable,
    NoReplicaLeft,
    NoSpace,
)
from cargohold.services.fuse import FuseSession, unmount
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import open_store

log = logging.getLogger(__name__)

MarkFailed = Callable[[str, str], Awaitable[None]]
T = TypeVar("T")
STOP_TIMEOUT = 10.0
CONNECT_TIMEOUT = 2.0  # to a data server at attach
DOWN_CONNECT_TIMEOUT = 0.3  # to one the controller has marked down
STAT_TIMEOUT = 10.0
#: The agent sends this signal after the volume grew: the engine reads the new size from the
#: metadata store, checks its replicas and makes the FUSE file grow (``resize_on_signal``).
RESIZE_SIGNAL = signal.SIGUSR1


@dataclass
class Member:
    server: DataServer
    client: DataClient


class ReplicaSet:
    """Fans one volume's I/O out to its in-sync replicas."""

    def __init__(self, volume: Volume, servers: Mapping[str, DataServer], epoch: int,
                 local_node: str, mark_failed: MarkFailed) -> None:
        self.name = volume.name
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
        self._generation = epoch << 32
        self._trims = 0  # trims so far (read repair checks nothing changed under it)
        self.fenced: Fenced | None = None  # once fenced, every later I/O fails at once

    async def open(self) -> None:
        """Connect to every in-sync replica and claim it with this attachment's epoch."""
        for server_id in self._missing:
            await self._mark_failed(server_id, "data server is not registered")
        # All at once; a server the controller has marked down gets a short connect timeout
        # (a dead host does not refuse, it just never answers: no need to wait long for it).
        clients = [DataClient(server.address, server.id, self._local_socket(server))
                   for server in self._wanted]
        results = await asyncio.gather(
            *(self._claim(client, DOWN_CONNECT_TIMEOUT if server.state is ServerState.DOWN
                          else CONNECT_TIMEOUT)
              for server, client in zip(self._wanted, clients, strict=True)),
            return_exceptions=True)
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
        if copied:
            log.warning("%s: %d chunks differed among the in-sync replicas and were copied "
                        "from the newest", self.name, copied)

    def _local_socket(self, server: DataServer) -> str | None:
        """The unix socket of a data server on this host (see ``LOCAL_SOCKET``)."""
        if server.node != self._local_node or not server.path:
            return None
        return os.path.join(server.path, LOCAL_SOCKET)

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
                tables.append((member, _as_le_u64(bytes(result))))
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
                *(m.client.write(self.volume_id, self.epoch, offset, data, newest)
                  for m in stale), return_exceptions=True)
            await self._settle(stale, written, "reconcile")
            copied += 1
        return copied

    async def close(self) -> None:
        for member in self.members:
            await member.client.close()
        self.members = []

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
        return True

    # -- the data path -------------------------------------------------------------------

    def _check_fenced(self) -> None:
        if self.fenced is not None:
            raise self.fenced

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    async def read(self, offset: int, length: int) -> BytesLike:
        return await self.start_read(offset, length)

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
        _chain(asyncio.ensure_future(self._read_slowly(offset, length, member, error)), done)

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

    def start_write(self, offset: int, data: BytesLike) -> asyncio.Future[None]:
        """Write to every in-sync replica; the future resolves once all acknowledged.

        The common case (aligned, every replica answers OK, no replica being marked out of
        sync) sends to every replica at once and completes from their response futures: no
        coroutine or task per request. A failure continues in a task (``_settle``) that
        records the failed replica in the metadata store before the write completes.
        """
        if self.fenced is not None or offset % BLOCK_SIZE or len(data) % BLOCK_SIZE:
            return asyncio.ensure_future(self._write_slowly(offset, data))
        generation = self._next_generation()
        members = list(self.members)
        replies = [m.client.start_write(self.volume_id, self.epoch, offset, data, generation)
                   for m in members]
        if not replies:
            return asyncio.ensure_future(self._settle([], [], "write"))
        done: asyncio.Future[None] = replies[0].get_loop().create_future()
        _FanIn(self, done, members, replies, "write")
        return done

    async def _write_slowly(self, offset: int, data: BytesLike) -> None:
        self._check_fenced()
        if offset % BLOCK_SIZE or len(data) % BLOCK_SIZE:
            await self._write_unaligned(offset, data)
            return
        await self.start_write(offset, data)

    async def flush(self) -> None:
        self._check_fenced()
        members = list(self.members)
        results = await asyncio.gather(
            *(m.client.flush(self.volume_id, self.epoch) for m in members),
            return_exceptions=True,
        )
        await self._settle(members, results, "flush")

    async def trim(self, offset: int, length: int) -> None:
        self._check_fenced()
        self._trims += 1
        start = -(-offset // BLOCK_SIZE) * BLOCK_SIZE  # only whole blocks become holes
        end = (offset + length) // BLOCK_SIZE * BLOCK_SIZE
        if end <= start:
            return
        members = list(self.members)
        results = await asyncio.gather(
            *(m.client.trim(self.volume_id, self.epoch, start, end - start) for m in members),
            return_exceptions=True,
        )
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
        for member, result in zip(members, results, strict=True):
            if isinstance(result, Fenced):
                self._fence(result)
                raise result
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

    def _fence(self, error: Fenced) -> None:
        if self.fenced is None:
            log.error("fenced: volume %s is attached elsewhere now (%s); refusing all I/O",
                      self.name, error)
            self.fenced = error

    async def _drop(self, member: Member, reason: str) -> None:
        """Take a replica out of the set; returns once the metadata store knows."""
        server_id = member.server.id
        pending = self._failing.get(server_id)
        if pending is None:
            log.error("replica on data server %s leaves the in-sync set: %s", server_id, reason)
            if member in self.members:
                self.members.remove(member)
            pending = asyncio.ensure_future(self._mark_failed(server_id, reason))
            self._failing[server_id] = pending
            pending.add_done_callback(lambda _: asyncio.ensure_future(member.client.close()))
        await asyncio.shield(pending)


class _FanIn:
    """Completes ``done`` once every replica answered one fanned-out request.

    All OK (and no replica being marked out of sync meanwhile): ``done`` resolves from the
    last response callback. Otherwise the results go through ``ReplicaSet._settle`` in a task,
    which records failed replicas before ``done`` completes.
    """

    __slots__ = ("_replicas", "_done", "_members", "_replies", "_what", "_left")

    def __init__(self, replicas: ReplicaSet, done: asyncio.Future[None], members: list[Member],
                 replies: list[asyncio.Future[bytes | memoryview]], what: str) -> None:
        self._replicas = replicas
        self._done = done
        self._members = members
        self._replies = replies
        self._what = what
        self._left = len(replies)
        for reply in replies:
            reply.add_done_callback(self._answered)

    def _answered(self, _reply: asyncio.Future[bytes | memoryview]) -> None:
        self._left -= 1
        if self._left:
            return
        done, replicas = self._done, self._replicas
        if done.cancelled():
            return
        if (all(not r.cancelled() and r.exception() is None for r in self._replies)
                and replicas.members and not replicas._marking()):
            done.set_result(None)
            return
        results = [r.exception() if not r.cancelled() else asyncio.CancelledError()
                   for r in self._replies]
        _chain(asyncio.ensure_future(replicas._settle(self._members, results, self._what)), done)


def _chain(source: asyncio.Future[T], target: asyncio.Future[T]) -> None:
    """Complete ``target`` like ``source`` once it is done."""

    def copy(_: asyncio.Future[T]) -> None:
        if target.done():
            return
        if source.cancelled():
            target.cancel()
        elif (error := source.exception()) is not None:
            target.set_exception(error)
        else:
            target.set_result(source.result())

    source.add_done_callback(copy)


def _as_le_u64(raw: bytes) -> array[int]:
    table = array("Q", raw)  # the data servers answer GENS little-endian
    if sys.byteorder == "big":
        table.byteswap()
    return table


def out_of_sync_marker(catalog: Catalog, name: str, epoch: int) -> MarkFailed:
    """Build the callback that records a failed replica, refusing if we were fenced."""

    async def mark(server_id: str, reason: str) -> None:
        def change(volume: Volume) -> Volume | None:
            if volume.attachment is None or volume.attachment.epoch != epoch:
                raise Fenced(volume_id=volume.id, epoch=epoch, current=volume.epoch)
            for replica in volume.replicas:
                if replica.server == server_id and replica.state is ReplicaState.IN_SYNC:
                    replica.state = ReplicaState.OUT_OF_SYNC
                    replica.reason = reason
                    return volume
            return None

        delay = 0.05
        for _ in range(40):  # ~20 s of metadata outage before the I/O fails
            try:
                await catalog.update_volume(name, change)
                return
            except MetadataUnavailable as e:
                log.warning("cannot record failed replica yet: %s", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise MetadataUnavailable(url=catalog.store.url, detail="could not record a failed replica")

    return mark


def resize_on_signal(catalog: Catalog, name: str, epoch: int, replicas: ReplicaSet,
                     session: FuseSession) -> Callable[[], None]:
    """The ``RESIZE_SIGNAL`` handler: take the volume's recorded size if it grew.

    The new size is read from the volume record (only while this attachment's epoch still
    holds it), checked against every replica (``ReplicaSet.grow``), and announced to the
    kernel (``FuseSession.resized``). The agent waits until ``stat`` of the FUSE file shows
    it. Signals that arrive during a refresh are folded into one more refresh.
    """
    running: asyncio.Task[None] | None = None
    again = False

    async def refresh() -> None:
        nonlocal again
        while True:
            again = False
            try:
                volume = await catalog.volume(name)
                if volume.attachment is None or volume.attachment.epoch != epoch:
                    log.warning("%s: not resizing: the volume is no longer attached with epoch "
                                "%d", name, epoch)
                elif await replicas.grow(volume.size):
                    session.resized()
            except (CargoholdError, OSError) as e:
                log.error("%s: resize failed: %s", name, e)
            if not again:
                return

    def on_signal() -> None:
        nonlocal running, again
        if running is not None and not running.done():
            again = True
            return
        running = asyncio.ensure_future(refresh())

    return on_signal


async def serve(metadata_url: str, name: str, epoch: int, node: str, mountpoint: str,
                ready_file: Path) -> int:
    """Run the engine until it is unmounted or told to stop; return the exit status."""
    store = open_store(metadata_url)
    catalog = Catalog(store)
    try:
        volume = await catalog.volume(name)
        if volume.attachment is None or volume.attachment.epoch != epoch:
            raise Fenced(volume_id=volume.id, epoch=epoch, current=volume.epoch)
        servers = {s.id: s for s in await catalog.servers()}
        replicas = ReplicaSet(volume, servers, epoch, node,
                              out_of_sync_marker(catalog, name, epoch))
        await replicas.open()
        session = FuseSession(replicas, mountpoint)
        try:
            session.start()
        except OSError:
            await replicas.close()
            raise
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(RESIZE_SIGNAL,
                                resize_on_signal(catalog, name, epoch, replicas, session))
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "mountpoint": mountpoint}))
        tmp.rename(ready_file)
        log.info("engine for %s (epoch %d) serving on %s", name, epoch, mountpoint)

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopped, asyncio.ensure_future(session.wait_closed())],
                           return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        await session.drain()
        try:
            await replicas.flush()
        except CargoholdError as e:
            log.error("final flush failed: %s", e)
        if session.fd >= 0:
            try:
                unmount(mountpoint, lazy=True)
            except OSError as e:
                log.warning("%s", e)
            try:
                await asyncio.wait_for(session.wait_closed(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("the kernel kept the FUSE connection open; closing it")
                session._finish()
        await replicas.close()
        return 0
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cargohold-engine")
    parser.add_argument("--metadata", required=True)
    parser.add_argument("--volume", required=True)
    parser.add_argument("--epoch", type=int, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s engine[%(process)d] %(levelname)s %(message)s")
    try:
        return uvloop.run(serve(args.metadata, args.volume, args.epoch, args.node,
                                 args.mountpoint, args.ready_file))
    except CargoholdError as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
