"""The receiving side of replication between clusters: standbys, and their promotion.

A source cluster sends a volume as *points*: each a snapshot cut there (crash-consistent, at
one write barrier of its engine), shipped as the chunks that changed since the point the
standby holds (its *base*). A copy is a session on one node of this cluster: ``begin``
makes the standby (the first time: placed like any volume, with the source's size, file
system and key) or checks that it holds the base, and takes a new epoch on it, so that any
older writer is fenced; ``write_batch`` puts chunks (whole, holes, or their changed
blocks) on every replica, many in one request; ``commit`` flushes every replica and cuts
the standby's own snapshot ``repl-POINT``, which is the point held from then on (the
previous one goes). A standby
between points (a copy that stopped midway) is put back to the point it holds when it is
promoted, so a promoted volume is always a point the source had whole.

A standby cannot be attached. ``promote`` makes it a volume of its own, and remembers whose
standby it was: a copy from that source is refused from then on (``volume_promoted``), which
tells the source it is fenced. The promoted volume can be replicated back; the old source
then takes the point both hold as the base (put back to it: what was written there after
that point, past the promotion, is dropped) and becomes its standby, so only what changed
since is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from cargohold.clients.access import Access
from cargohold.clients.dataclient import DataClient
from cargohold.core import chunkdelta
from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.models import PromotedFrom, ReplicaOf, Volume
from cargohold.core.names import check_name
from cargohold.errors import (
    CargoholdError,
    InvalidArgument,
    ReplicationBaseMissing,
    VolumeBusy,
    VolumeExists,
    VolumeInUse,
    VolumePromoted,
)
from cargohold.services.clones import CloneService
from cargohold.services.controller.resync import claim_detached
from cargohold.services.snapshots import SnapshotService
from cargohold.services.volumes import ServerSession, VolumeService

log = logging.getLogger(__name__)

#: A session nobody wrote to for this long is dropped (its source stopped midway).
SESSION_IDLE = 300.0
#: The longest a copy or promotion waits for the snapshot of the point committed before.
CUT_WAIT = 60.0
POINT_PREFIX = "repl-"


def point_snapshot(point: str) -> str:
    """The name of the snapshot that holds replication point ``point`` (on both sides)."""
    return f"{POINT_PREFIX}{point}"


@dataclass
class Session:
    id: str
    volume: str
    volume_id: str
    epoch: int
    size: int
    point: str
    created: float  # when the source cut the point
    stack: AsyncExitStack
    writers: list[DataClient]
    chunks: int = 0
    bytes: int = 0
    touched: float = field(default_factory=time.monotonic)
    written: asyncio.Event = field(default_factory=asyncio.Event)  # since the last flush
    flusher: asyncio.Task[None] | None = None

    async def flush_behind(self) -> None:
        """Flush the replicas while the copy goes on, so that the commit's flush finds
        little left to write (its writers may be held meanwhile)."""
        while True:
            await self.written.wait()
            self.written.clear()
            await asyncio.gather(*(w.flush(self.volume_id, self.epoch) for w in self.writers))

    async def stop_flushing(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            await asyncio.gather(self.flusher, return_exceptions=True)
            self.flusher = None


class StandbyService:
    def __init__(self, volumes: VolumeService, snapshots: SnapshotService,
                 clones: CloneService, access: Access | None = None) -> None:
        self.volumes = volumes
        self.catalog = volumes.catalog
        self.snapshots = snapshots
        self.clones = clones
        self.access = access
        self._sessions: dict[str, Session] = {}
        self._cleanups: set[asyncio.Task[None]] = set()

    async def begin(self, name: str, source: dict[str, str], point: str, base: str,
                    size: int, fs: str, replicas: int, created: float,
                    key: bytes | None = None) -> dict[str, Any]:
        """Start receiving point ``point`` of the source volume ``source`` (cluster,
        volume, volume_id) into standby ``name``, on top of the point ``base`` it holds
        ("": the whole volume comes). Returns the session."""
        check_name(name)
        check_name(point_snapshot(point))
        await self._drop_idle()
        volume = await self.catalog.find_volume(name)
        if volume is not None:
            volume = await self._ready_for(await self._cut_done(name), source, base, size)
        made = volume is None
        if volume is None:
            if base:
                raise ReplicationBaseMissing(name=name, point=base, detail="no such volume "
                                             "here")
            volume = await self.volumes.create(name, size, replicas, fs, key=key,
                                               source=f"{source['volume']} (replicated)")
        try:
            if made:
                await self.catalog.update_volume(name, lambda v: _standby_of(v, source))
            for old in [s for s in self._sessions.values() if s.volume == name]:
                await self._close(old)
            claimed, stack, writers = await self._claim(name, point)
        except BaseException:
            if made:  # nothing half made is left
                with contextlib.suppress(CargoholdError):
                    await asyncio.shield(self.volumes.remove(name))
            raise
        session = Session(uuid.uuid4().hex, name, claimed.id, claimed.epoch, claimed.size,
                          point, created, stack, writers)
        self._sessions[session.id] = session
        log.info("standby %s: receiving point %s of %s (base %s)", name, point,
                 source["volume"], base or "none: everything")
        return {"session": session.id, "volume": name, "epoch": claimed.epoch}

    async def _claim(self, name: str, point: str
                     ) -> tuple[Volume, AsyncExitStack, list[DataClient]]:
        """A new epoch on standby ``name`` (fencing any older writer) and a connection to
        each of its in-sync replicas."""
        def receiving(v: Volume) -> None:
            assert v.replica_of is not None
            v.replica_of.receiving = point

        claimed = await claim_detached(self.catalog, name, "a copy from another cluster",
                                       receiving)
        servers = {s.id: s for s in await self.catalog.servers()}
        stack = AsyncExitStack()
        try:
            writers = [await stack.enter_async_context(
                ServerSession(servers[r.server], self.access, copying=True))
                for r in claimed.in_sync() if r.server in servers]
            if not writers:
                raise VolumeBusy(name=name, state="without a replica in sync here")
        except BaseException:
            await stack.aclose()
            raise
        return claimed, stack, writers

    async def _ready_for(self, volume: Volume, source: dict[str, str], base: str,
                         size: int) -> Volume | None:
        """Check that existing ``volume`` may take a copy from ``source`` on ``base``
        (None: it was removed, the whole volume comes again)."""
        name = volume.name
        promoted = volume.promoted_from
        if promoted is not None and promoted.volume_id == source["volume_id"]:
            raise VolumePromoted(name=name, detail=time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(promoted.at)))
        if volume.attachment is not None:
            raise VolumeInUse(name=name, node=volume.attachment.node)
        held = volume.replica_of
        if held is None:
            kept = await self.catalog.find_snapshot(name, point_snapshot(base)) if base else None
            if not volume.fenced_by or kept is None:
                raise VolumeExists(name=name)
            # the old source, fenced: it takes the promoted copy's changes since the point
            # both hold, put back to that point first
            await self.clones.revert(name, f"{name}@{point_snapshot(base)}")
            created = kept.created
            volume = await self.catalog.update_volume(name, lambda v: _standby_of(
                v, source, base, created))
            log.warning("volume %s follows %s again from point %s: what it took after that "
                        "point is dropped", name, source["volume"], base)
        elif held.volume_id != source["volume_id"] or held.cluster != source["cluster"]:
            raise VolumeExists(name=name)
        elif not base or base != held.point:
            if base:
                raise ReplicationBaseMissing(name=name, point=base,
                                             detail=f"it holds {held.point or 'no point'}")
            await self._remove_standby(volume)  # a whole copy comes: start anew
            return None
        if size > volume.size:
            volume = await self.volumes.resize(name, size)
        elif size < volume.size:
            raise InvalidArgument(what="size", detail=f"the source is smaller than standby "
                                  f"{name}: volumes only grow")
        return volume

    async def write_batch(self, name: str, session_id: str, body: bytes) -> int:
        """Apply a batch of chunk changes (``core/chunkdelta.py``) to every replica of
        standby ``name``, all checked before any is written; returns how many."""
        session = self._session(name, session_id)
        generation = (session.epoch << 32) + 1
        session.touched = time.monotonic()
        writes = []
        for chunk, kind, payload in chunkdelta.decode_batch(body):
            offset = chunk * CHUNK_SIZE
            if not 0 <= offset < session.size:
                raise InvalidArgument(what="chunk", detail=f"{chunk} is beyond the volume")
            length = min(CHUNK_SIZE, session.size - offset)
            if kind == chunkdelta.WHOLE and len(payload) != length:
                raise InvalidArgument(what="chunk", detail=f"{len(payload)} bytes where "
                                      f"chunk {chunk} has {length}")
            if kind == chunkdelta.DELTA:
                spans = list(chunkdelta.decode(payload))
                if offset + spans[-1][0] + len(spans[-1][1]) > session.size:
                    raise InvalidArgument(what="blocks", detail="beyond the volume")
            writes.append((offset, length, kind, payload))
        vid, epoch = session.volume_id, session.epoch
        await asyncio.gather(*(
            w.trim(vid, epoch, offset, length, generation) if kind == chunkdelta.HOLE else
            w.write(vid, epoch, offset, payload, generation) if kind == chunkdelta.WHOLE else
            w.write_blocks(vid, epoch, offset, payload, generation)
            for offset, length, kind, payload in writes for w in session.writers))
        session.chunks += len(writes)
        session.bytes += sum(len(p) for _, _, kind, p in writes if kind != chunkdelta.HOLE)
        if session.flusher is None:
            session.flusher = asyncio.ensure_future(session.flush_behind())
        session.written.set()
        return len(writes)

    async def commit(self, name: str, session_id: str) -> dict[str, Any]:
        """Make the point received the one standby ``name`` holds."""
        session = self._session(name, session_id)
        started = time.monotonic()
        await session.stop_flushing()
        await asyncio.gather(*(w.flush(session.volume_id, session.epoch)
                               for w in session.writers))
        flushed = time.monotonic() - started
        await self._close(session)
        closed = time.monotonic() - started
        old = ""

        def held(v: Volume) -> Volume:
            nonlocal old
            if v.replica_of is None or v.id != session.volume_id:
                raise VolumeBusy(name=name, state="no longer a standby (promoted meanwhile)")
            old = v.replica_of.point
            v.replica_of.point, v.replica_of.point_created = session.point, session.created
            v.replica_of.receiving, v.replica_of.received = "", time.time()
            v.replica_of.cutting = session.point
            return v

        await self.catalog.update_volume(name, held)
        # the point is whole and durable on every replica: the answer goes now (a handover's
        # writers wait for it), its snapshot is cut after; a copy or a promotion that comes
        # meanwhile waits for that (``_cut_done``)
        task = asyncio.ensure_future(self._cut_point(name, session.point, old))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        log.info("standby %s holds point %s: %d chunks, %d bytes (flushed in %.0f ms, "
                 "closed at %.0f, recorded at %.0f)", name, session.point, session.chunks,
                 session.bytes, flushed * 1000, closed * 1000,
                 (time.monotonic() - started) * 1000)
        return {"volume": name, "point": session.point,
                "snapshot": f"{name}@{point_snapshot(session.point)}",
                "chunks": session.chunks, "bytes": session.bytes}

    async def _cut_point(self, name: str, point: str, old: str) -> None:
        try:
            await self.snapshots.create(name, point_snapshot(point))
        except CargoholdError as e:
            log.error("standby %s: the snapshot of point %s was not cut (%s); the next copy "
                      "cuts its own", name, point, e)

        def cut(v: Volume) -> Volume | None:
            if v.replica_of is None or v.replica_of.cutting != point:
                return None
            v.replica_of.cutting = ""
            return v

        with contextlib.suppress(CargoholdError):
            await self.catalog.update_volume(name, cut)
        if old and old != point:
            await self._drop_point(name, old)

    async def _cut_done(self, name: str) -> Volume:
        """The standby's record once no point snapshot is being cut (a commit's, on any
        node: its writes must come before the next copy's, and a promotion's revert needs
        it)."""
        deadline = time.monotonic() + CUT_WAIT
        while True:
            volume = await self.catalog.volume(name)
            if volume.replica_of is None or not volume.replica_of.cutting:
                return volume
            if time.monotonic() > deadline:
                raise VolumeBusy(name=name, state=f"cutting the snapshot of point "
                                 f"{volume.replica_of.cutting} for over {CUT_WAIT:g} s")
            await asyncio.sleep(0.02)

    async def _drop_point(self, name: str, point: str) -> None:
        with contextlib.suppress(CargoholdError):
            await self.snapshots.remove(name, point_snapshot(point))

    async def abort(self, name: str, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None and session.volume == name:
            await self._close(session)

    async def promote(self, name: str) -> Volume:
        """Make standby ``name`` writable: put back to the point it holds whole if a copy
        stopped midway, and no longer fed by its source (which is refused from now on). A
        fenced former source is made writable again instead (it then differs from the
        copy that was promoted)."""
        volume = await self._cut_done(name)
        if volume.fenced_by and volume.replica_of is None:
            return await self._unfence(name)
        held = volume.replica_of
        if held is None:
            raise InvalidArgument(what="volume", detail=f"{name!r} is not a standby of "
                                  "another cluster's volume")
        if not held.point:
            raise VolumeBusy(name=name, state="a standby that holds no whole copy yet (its "
                             "first copy has not finished)")
        for old in [s for s in self._sessions.values() if s.volume == name]:
            await self._close(old)
        if held.receiving:
            await self.clones.revert(name, f"{name}@{point_snapshot(held.point)}")

        def promoted(v: Volume) -> None:
            assert v.replica_of is not None
            v.promoted_from = PromotedFrom(cluster=v.replica_of.cluster,
                                           volume=v.replica_of.volume,
                                           volume_id=v.replica_of.volume_id,
                                           point=v.replica_of.point)
            v.replica_of = None

        volume = await claim_detached(self.catalog, name, "a promotion", promoted)
        log.warning("standby %s promoted: it holds point %s of %s; copies from there are "
                    "refused from now on", name, held.point, held.volume)
        return volume

    async def _unfence(self, name: str) -> Volume:
        def writable(v: Volume) -> Volume:
            v.fenced_by = ""
            v.replication = None
            return v

        volume = await self.catalog.update_volume(name, writable)
        log.warning("volume %s made writable again by hand: it no longer follows the copy "
                    "that was promoted", name)
        return volume

    def _session(self, name: str, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.volume != name:
            raise VolumeBusy(name=session_id, state="not a copy session of this node (it "
                             "ended, or the node restarted): start the copy again")
        return session

    async def _close(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        await session.stop_flushing()
        await session.stack.aclose()

    async def _drop_idle(self) -> None:
        now = time.monotonic()
        for session in [s for s in self._sessions.values()
                        if now - s.touched > SESSION_IDLE]:
            log.warning("copy session %s into %s dropped: idle for %.0f s", session.id,
                        session.volume, now - session.touched)
            await self._close(session)

    async def _remove_standby(self, volume: Volume) -> None:
        for snapshot in await self.catalog.snapshots(volume.name):
            await self.snapshots.remove(volume.name, snapshot.name)
        await self.volumes.remove(volume.name)

    async def close(self) -> None:
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        for session in list(self._sessions.values()):
            await self._close(session)


def _standby_of(volume: Volume, source: dict[str, str], point: str = "",
                created: float = 0.0) -> Volume:
    volume.replica_of = ReplicaOf(cluster=source["cluster"], volume=source["volume"],
                                  volume_id=source["volume_id"], point=point,
                                  point_created=created)
    volume.fenced_by, volume.replication, volume.promoted_from = "", None, None
    return volume


def standby_state(volume: Volume) -> str:
    """A standby's state in words (``volume inspect``)."""
    held = volume.replica_of
    if held is None:
        return ""
    if not held.point:
        return f"receiving its first copy of {held.volume}"
    state = f"holds point {held.point} of {held.volume}"
    if held.receiving:
        state += f", receiving point {held.receiving}"
    return state

