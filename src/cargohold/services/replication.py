"""Replication to another cluster: the sending side.

A replicated volume is copied to a remote cluster (``services/remotes.py``) every so often,
by the controller, as *points*: a snapshot ``repl-POINT`` cut here (at one write barrier of
the engine, the file system frozen around it, so the copy is crash-consistent and mounts
clean), of which only what was written since the previous point is sent, found from the
replicas' own records (SNAPSHOT_DIFF in 4 KiB blocks), never by reading the volume: a chunk
of which fewer than half the blocks changed goes as those blocks (read for 64 chunks at a
time in one data request), the others whole, many chunks per request to the remote
(``core/chunkdelta.py``). The remote answers in sessions (``services/standbys.py``); once it
has committed a point, that point's snapshot is the base of the next round here and the
previous one goes. A round that fails leaves the previous point in place on both sides: the
next round sends everything since it again.

The copy's age, ``lag``, is the time since the point the remote holds was cut: what a
promotion of the remote would lose (the RPO). A remote that answers ``volume_promoted`` has
made its copy the primary: this volume is then fenced (``fenced_by``): its engine, if
attached, is refused by the data servers from then on, and it cannot be attached.

Rounds of one volume never overlap: a round is claimed with a compare-and-swap of
``last_started`` (two controllers for a moment: one wins), and runs on the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from cargohold.clients.access import Access
from cargohold.clients.dataclient import DataClient
from cargohold.clients.remote import CONNECTIONS, RemoteCluster
from cargohold.core import chunkdelta
from cargohold.core.capability import SNAPSHOT_READS
from cargohold.core.cipher import unwrap_key
from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE
from cargohold.core.models import (
    MigrationState,
    Replication,
    Snapshot,
    SnapshotState,
    Volume,
)
from cargohold.core.names import check_name
from cargohold.errors import (
    CargoholdError,
    InvalidArgument,
    ReplicationBaseMissing,
    VolumeBusy,
    VolumeDemoted,
    VolumePromoted,
)
from cargohold.services.copies import snapshot_reader, together
from cargohold.services.remotes import RemoteService
from cargohold.services.schedules import parse_every
from cargohold.services.snapshots import SnapshotService
from cargohold.services.standbys import point_snapshot
from cargohold.services.volumes import ServerSession

log = logging.getLogger(__name__)

#: The shortest period between rounds.
MIN_EVERY = 10.0
#: Seconds between progress records of a round.
PROGRESS_EVERY = 1.0
#: A sender sends its chunks in batches of at most this many, or about this many bytes.
BATCH_RECORDS = 64
BATCH_BYTES = 4 << 20


class ReplicationService:
    def __init__(self, snapshots: SnapshotService, remotes: RemoteService,
                 access: Access | None = None, least: float = MIN_EVERY) -> None:
        self.snapshots = snapshots
        self.catalog = snapshots.catalog
        self.remotes = remotes
        self.access = access
        self.least = least
        self._rounds: dict[str, asyncio.Task[None]] = {}
        self._shipping: dict[str, asyncio.Lock] = {}  # one round of a volume at a time
        self._cleanups: set[asyncio.Task[None]] = set()

    async def start(self, name: str, remote: str, every: str | float) -> Volume:
        """Copy volume ``name`` to cluster ``remote`` every ``every``; the first round
        starts at the controller's next turn."""
        check_name(name)
        period = parse_every(every, self.least)
        await self.catalog.remote(remote)  # it exists
        base = ""
        created = 0.0
        volume = await self.catalog.volume(name)
        if volume.promoted_from is not None:  # the copy of a promotion goes back: the point
            kept = await self.catalog.find_snapshot(  # both hold is the base
                name, point_snapshot(volume.promoted_from.point))
            if kept is not None and kept.state is SnapshotState.READY:
                base, created = volume.promoted_from.point, kept.created

        def replicated(v: Volume) -> Volume:
            if v.replica_of is not None:
                raise VolumeBusy(name=name, state=f"a standby of {v.replica_of.volume} on "
                                 "another cluster (promote it first)")
            if v.fenced_by:
                raise VolumeDemoted(name=name, why=v.fenced_by)
            if v.replication is not None and v.replication.remote != remote:
                raise VolumeBusy(name=name, state=f"replicated to {v.replication.remote} "
                                 "('cargohold volume replicate NAME --off' first)")
            if v.replication is not None:
                v.replication.every = period
            else:
                v.replication = Replication(remote=remote, every=period, point=base,
                                            point_created=created)
            return v

        volume = await self.catalog.update_volume(name, replicated)
        log.info("volume %s replicated to %s every %g s", name, remote, period)
        return volume

    async def now(self, name: str) -> Volume:
        """Have the controller start a round of ``name`` at its next turn."""
        def due(v: Volume) -> Volume:
            if v.replication is None:
                raise InvalidArgument(what="volume", detail=f"{name!r} is not replicated")
            v.replication.last_started = 0.0
            return v

        return await self.catalog.update_volume(name, due)

    async def stop(self, name: str) -> Volume:
        """Stop copying ``name`` (the remote keeps its standby; the point kept here for
        the next round goes)."""
        volume = await self.catalog.volume(name)
        if volume.replication is None:
            raise InvalidArgument(what="volume", detail=f"{name!r} is not replicated")
        running = self._rounds.get(name)
        if running is not None:
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
        point = volume.replication.point

        def stopped(v: Volume) -> Volume:
            v.replication = None
            return v

        volume = await self.catalog.update_volume(name, stopped)
        if point:
            with contextlib.suppress(CargoholdError):
                await self.snapshots.remove(name, point_snapshot(point))
        return volume

    async def run_once(self, now: float | None = None) -> list[str]:
        """The controller's turn: start the rounds that are due; return their volumes."""
        now = time.time() if now is None else now
        started = []
        for volume in await self.catalog.volumes():
            rep = volume.replication
            if rep is None or volume.fenced_by or volume.name in self._rounds:
                continue
            if volume.migration is not None and volume.migration.state in (
                    MigrationState.COPYING, MigrationState.READY, MigrationState.HANDOVER):
                continue  # its migration makes the rounds
            if now - rep.last_started < rep.every:
                continue
            due = rep.last_started

            def turn(v: Volume, due: float = due) -> Volume:
                if v.replication is None or v.replication.last_started != due:
                    raise _Skip  # another controller took this turn
                v.replication.last_started = now
                return v

            try:
                await self.catalog.update_volume(volume.name, turn)
            except _Skip:
                continue
            task = asyncio.ensure_future(self._round(volume.name))
            self._rounds[volume.name] = task
            task.add_done_callback(self._ended(volume.name))
            started.append(volume.name)
        return started

    def _ended(self, name: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(_task: asyncio.Task[None]) -> None:
            self._rounds.pop(name, None)

        return forget

    async def stop_rounds(self) -> None:
        """The node stops (or leads no more): rounds end, the next controller retries."""
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        tasks = list(self._rounds.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _round(self, name: str) -> None:
        try:
            await self.ship(name)
        except asyncio.CancelledError:
            await asyncio.shield(self._failed(name, "interrupted (the controller stopped)"))
        except CargoholdError as e:
            log.warning("replication of %s: round failed: %s", name, e)
            await asyncio.shield(self._failed(name, e.message))
        except Exception as e:
            log.exception("replication of %s: round failed", name)
            await asyncio.shield(self._failed(name, f"{type(e).__name__}: {e}"))

    async def ship(self, name: str,
                   cut: Callable[[str, str], Awaitable[Snapshot]] | None = None,
                   copied: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
        """One round: cut a point, send what changed since the remote's point, commit.
        ``cut``: how the point is cut (a migration's final round holds the writes);
        ``copied``: what to do once all is sent, while the remote makes it durable and
        records it (a handover fences the source then).

        Rounds of one volume go one after the other: a migration's first round and a
        scheduled round that started at the same turn would each begin a session on the
        remote, and the later one would fence the earlier (seen after a restart)."""
        async with self._shipping.setdefault(name, asyncio.Lock()):
            return await self._ship(name, cut, copied)

    async def _ship(self, name: str, cut: Callable[[str, str], Awaitable[Snapshot]] | None,
                    copied: Callable[[], Awaitable[None]] | None) -> dict[str, Any]:
        volume = await self.catalog.volume(name)
        if volume.replication is None:
            raise InvalidArgument(what="volume", detail=f"{name!r} is not replicated")
        rep = volume.replication
        point = uuid.uuid4().hex[:16]
        started = time.monotonic()
        snapshot = await (cut or self._cut)(name, point_snapshot(point))
        steps = {"cut": time.monotonic() - started}
        try:
            async with await self.remotes.open(rep.remote) as remote:
                sent = await self._send(volume, snapshot, point, remote, steps, started,
                                        copied)
        except BaseException:
            with contextlib.suppress(CargoholdError):
                await asyncio.shield(self.snapshots.remove(name, snapshot.name))
            raise
        old = rep.point

        def done(v: Volume) -> Volume:
            if v.replication is not None:
                v.replication.point, v.replication.point_created = point, snapshot.created
                v.replication.last_finished, v.replication.last_bytes = time.time(), sent
                v.replication.last_error = ""
                v.replication.progress, v.replication.sending = 0.0, ""
            return v

        await self.catalog.update_volume(name, done)
        if old and old != point:  # not in the way of what follows (a handover's writers)
            self._later(self._drop_point(name, old))
        seconds = time.monotonic() - started
        log.info("replication of %s to %s: point %s sent (%d bytes in %.2f s: %s)", name,
                 rep.remote, point, sent, seconds,
                 ", ".join(f"{k} at {v:.2f}" for k, v in steps.items()))
        return {"volume": name, "remote": rep.remote, "point": point, "bytes": sent,
                "seconds": round(seconds, 3), "held": snapshot.held}

    def _later(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _drop_point(self, name: str, point: str) -> None:
        with contextlib.suppress(CargoholdError):
            await self.snapshots.remove(name, point_snapshot(point))

    async def _cut(self, name: str, snapshot: str) -> Snapshot:
        return await self.snapshots.create(name, snapshot)

    async def _send(self, volume: Volume, snapshot: Snapshot, point: str,
                    remote: RemoteCluster, steps: dict[str, float], started: float,
                    copied: Callable[[], Awaitable[None]] | None) -> int:
        """Send ``snapshot`` as point ``point``: on the remote's point if it holds it, else
        whole. Returns the bytes sent."""
        rep = volume.replication
        assert rep is not None
        base = rep.point
        kept = await self.catalog.find_snapshot(volume.name, point_snapshot(base)) \
            if base else None
        if kept is None or kept.state is not SnapshotState.READY:
            base = ""
        servers = {s.id: s for s in await self.catalog.servers()}
        async with AsyncExitStack() as stack:
            reader = await snapshot_reader(snapshot, servers, self.access, stack)
            # the remote's session and what changed here, at once (each is a round trip
            # or two, and a handover's writers wait for both)
            beginning = asyncio.ensure_future(self._begin(volume, snapshot, point, base,
                                                          remote))
            try:
                work = await self._work(reader, snapshot, kept if base else None)
            except BaseException:
                await self._abandon(beginning, remote, volume.name)
                raise
            try:
                session = await beginning
            except ReplicationBaseMissing as e:
                log.warning("replication of %s: %s", volume.name, e.message)
                base = ""
                session = await self._begin(volume, snapshot, point, base, remote)
                work = await self._work(reader, snapshot, None)
            steps["begun and diffed"] = time.monotonic() - started
            path = f"/v1/standbys/{volume.name}/sessions/{session}"
            jobs = _jobs(work)
            pending = iter(jobs)
            sent = done = 0
            reported = time.monotonic()

            async def sender() -> None:
                nonlocal sent, done, reported
                batch: list[tuple[int, int, bytes]] = []
                for job in pending:
                    if isinstance(job, dict):  # scattered blocks of chunks: read, sent as is
                        body = await reader.read_snapshot_batch(
                            snapshot.volume_id, SNAPSHOT_READS, snapshot.id, job)
                        await remote.put(f"{path}/batch", body)
                        sent += sum(len(b) for b in job.values()) * BLOCK_SIZE
                    else:
                        record = await self._record(reader, snapshot, job)
                        batch.append(record)
                        if len(batch) >= BATCH_RECORDS or \
                                sum(len(r[2]) for r in batch) >= BATCH_BYTES:
                            await remote.put(f"{path}/batch", chunkdelta.encode_batch(batch))
                            batch = []
                        sent += len(record[2])
                    done += 1
                    if time.monotonic() - reported >= PROGRESS_EVERY:
                        reported = time.monotonic()
                        await self._progress(volume.name, point, done / len(jobs))
                if batch:
                    await remote.put(f"{path}/batch", chunkdelta.encode_batch(batch))

            try:
                await together([sender() for _ in range(CONNECTIONS)])
                steps["copied"] = time.monotonic() - started
                committing = asyncio.ensure_future(remote.request("POST", f"{path}/commit"))
                try:
                    if copied is not None:
                        await copied()
                        steps["handed over"] = time.monotonic() - started
                finally:
                    await asyncio.wait([committing])
                committing.result()
                steps["committed"] = time.monotonic() - started
            except BaseException:
                with contextlib.suppress(CargoholdError):
                    await asyncio.shield(remote.request("DELETE", path))
                raise
        return sent

    @staticmethod
    async def _abandon(beginning: asyncio.Future[str], remote: RemoteCluster,
                       name: str) -> None:
        """Stop a session's beginning, and end it on the remote if it began."""
        beginning.cancel()
        with contextlib.suppress(BaseException):
            session = await beginning
            await asyncio.shield(remote.request("DELETE",
                                                f"/v1/standbys/{name}/sessions/{session}"))

    async def _work(self, reader: DataClient, snapshot: Snapshot,
                    base: Snapshot | None) -> dict[int, list[int]]:
        """What to send: per chunk, its changed 4 KiB blocks since ``base`` ([]: the whole
        chunk, as for every chunk holding data when there is no base)."""
        if base is None:
            chunks = await reader.snapshot_diff(snapshot.volume_id, "", snapshot.id)
            return {c: [] for c in chunks if c * CHUNK_SIZE < snapshot.size}
        work: dict[int, list[int]] = {}
        for block in await reader.snapshot_diff(snapshot.volume_id, base.id, snapshot.id,
                                                blocks=True):
            if block * BLOCK_SIZE < snapshot.size:
                work.setdefault(block // chunkdelta.BLOCKS, []).append(
                    block % chunkdelta.BLOCKS)
        return work

    async def _record(self, reader: DataClient, snapshot: Snapshot,
                      chunk: int) -> tuple[int, int, bytes]:
        """A whole chunk to send, or a hole if it holds nothing."""
        offset = chunk * CHUNK_SIZE
        data = await reader.read_snapshot(snapshot.volume_id, SNAPSHOT_READS, snapshot.id,
                                          offset, min(CHUNK_SIZE, snapshot.size - offset))
        if not any(data):
            return chunk, chunkdelta.HOLE, b""
        return chunk, chunkdelta.WHOLE, bytes(data)

    async def _begin(self, volume: Volume, snapshot: Snapshot, point: str, base: str,
                     remote: RemoteCluster) -> str:
        key = None
        if volume.encryption is not None:
            if self.access is None or not self.access.key:
                raise InvalidArgument(what="volume", detail="an encrypted volume's key "
                                      "needs the cluster key to be sent")
            key = unwrap_key(self.access.key, volume.id, volume.encryption["key"]).hex()
        body = {"source": {"cluster": await self.catalog.cluster_id(), "volume": volume.name,
                           "volume_id": volume.id},
                "point": point, "base": base, "size": snapshot.size, "fs": volume.fs,
                "replicas": volume.replica_count, "created": snapshot.created, "key": key}
        try:
            found = await remote.request("POST", f"/v1/standbys/{volume.name}/sessions", body)
        except VolumePromoted as e:
            await self.fence(volume.name, f"its copy on {remote.name} was promoted: "
                             f"{e.message}")
            raise
        await self._progress(volume.name, point, 0.0)
        return str(found["session"])

    async def fence(self, name: str, why: str) -> Volume:
        """Fence volume ``name`` out: no attach, and its data servers refuse the epoch of an
        engine that has it attached (its writes fail from now on)."""
        def fenced(v: Volume) -> Volume:
            v.fenced_by = why
            v.epoch += 1
            return v

        volume = await self.catalog.update_volume(name, fenced)
        servers = {s.id: s for s in await self.catalog.servers()}
        for replica in volume.replicas:
            if replica.server in servers:
                try:
                    async with ServerSession(servers[replica.server], self.access) as client:
                        await client.fence(volume.id, volume.epoch)
                except CargoholdError as e:
                    log.warning("volume %s: data server %s not fenced now: %s", name,
                                replica.server, e)
        log.warning("volume %s fenced: %s", name, why)
        return volume

    async def _progress(self, name: str, point: str, done: float) -> None:
        def record(v: Volume) -> Volume:
            if v.replication is not None:
                v.replication.sending, v.replication.progress = point, round(done, 3)
            return v

        await self.catalog.update_volume(name, record)

    async def _failed(self, name: str, reason: str) -> None:
        def record(v: Volume) -> Volume:
            if v.replication is not None:
                v.replication.last_error, v.replication.last_failed = reason, time.time()
                v.replication.sending, v.replication.progress = "", 0.0
            return v

        with contextlib.suppress(CargoholdError):
            await self.catalog.update_volume(name, record)


class _Skip(Exception):
    """The record moved: this turn is another controller's."""


def _jobs(work: dict[int, list[int]]) -> list[int | dict[int, list[int]]]:
    """The work of a copy in pieces for its senders: chunks sent whole (one each), and the
    chunks of which fewer than half the blocks changed, ``BATCH_RECORDS`` at a time (one
    read and one send for them all)."""
    whole: list[int | dict[int, list[int]]] = []
    scattered: list[tuple[int, list[int]]] = []
    for chunk, blocks in sorted(work.items()):
        if blocks and len(blocks) * 2 < chunkdelta.BLOCKS:
            scattered.append((chunk, blocks))
        else:
            whole.append(chunk)
    groups: list[int | dict[int, list[int]]] = [
        dict(scattered[i:i + BATCH_RECORDS]) for i in range(0, len(scattered), BATCH_RECORDS)]
    return groups + whole


def lag(volume: Volume, now: float | None = None) -> float | None:
    """Seconds since the point the remote holds was cut (None: it holds none yet)."""
    rep = volume.replication
    if rep is None or not rep.point_created:
        return None
    return max(0.0, (time.time() if now is None else now) - rep.point_created)
