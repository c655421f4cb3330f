"""Filling clones: each clone's source snapshot is copied into its replicas in the background.

A clone exists, and can be attached and written, before any of its data is copied: its
record names its *origin* (the source snapshot), and its engine reads what the replicas lack
from there (:mod:`cargohold.services.engine.origin`). The controller fills every such clone,
one task each: it asks each replica which chunks it never wrote (generation 0), reads those
chunks of the snapshot from a data server that keeps it, and stores them with FILL, which
writes a chunk only if it still was never written, so it never overwrites what the clone's
writer wrote meanwhile, attached or not, and two fills of the same clone do no harm. Then
it asks again, since a replica may have been added (rebuild, a higher replica count), and
only when a pass finds nothing missing on every replica of the record, and the record still
names the same replicas, is the origin dropped (and a snapshot taken just for this clone
removed). From then on the clone depends on nothing; until then its source snapshot cannot
be removed (``SnapshotService.remove``) and the clone cannot have snapshots of its own.
Fills are rate limited with the rebuilds' rate, and restart where they were after a
controller failover (what is filled is on the replicas).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack

from cargohold.clients.access import Access
from cargohold.clients.dataclient import DataClient
from cargohold.core.capability import SNAPSHOT_READS
from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.models import Origin, Snapshot, Volume, VolumeState
from cargohold.errors import CargoholdError, Fenced, SnapshotFailed, SnapshotNotFound
from cargohold.services.copies import WINDOW, Budget, snapshot_reader, together
from cargohold.services.snapshots import SnapshotService
from cargohold.services.volumes import STALE_CUT, ServerSession
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

#: The generation a filled chunk carries: above never written (0), below any writer's.
FILL_GENERATION = 1
#: Seconds between progress records (``Volume.filled``, for the CLI's progress bar).
PROGRESS_EVERY = 1.0


class Fill:
    def __init__(self, catalog: Catalog, snapshots: SnapshotService, rate: float = 0.0,
                 access: Access | None = None) -> None:
        self.catalog = catalog
        self.snapshots = snapshots
        self.rate = rate  # bytes/s (0: unlimited)
        self.access = access
        self._running: dict[str, asyncio.Task[None]] = {}

    async def run_once(self) -> None:
        """Start filling each clone nobody fills yet; remove snapshots taken for clones
        that are gone."""
        for name, task in list(self._running.items()):
            if task.done():
                del self._running[name]
                if not task.cancelled() and task.exception() is not None:
                    log.error("filling clone %s: %s (tried again)", name, task.exception())
        volumes = await self.catalog.volumes()
        for volume in volumes:
            if (volume.origin is not None and volume.name not in self._running
                    and volume.state not in (VolumeState.CREATING, VolumeState.DELETING)):
                self._running[volume.name] = asyncio.ensure_future(self.fill(volume.name))
        needed = {v.origin.snapshot_id for v in volumes if v.origin is not None}
        for snapshot in await self.catalog.snapshots():
            if (snapshot.for_clone and snapshot.id not in needed
                    and time.time() - snapshot.created > STALE_CUT):
                await self._remove(snapshot)

    async def stop(self) -> None:
        """Stop every fill (another controller takes them over)."""
        tasks = list(self._running.values())
        self._running.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def fill(self, name: str) -> None:
        """Fill clone ``name`` until every replica holds all of its source, then drop its
        origin."""
        origin: Origin | None = None
        while True:
            volume = await self.catalog.find_volume(name)
            if volume is None or volume.origin is None:
                break
            origin = volume.origin
            if await self._fill_pass(volume, origin):
                break
        if origin is not None and origin.temporary:
            found = await self.catalog.find_snapshot(origin.volume, origin.snapshot)
            if found is not None and found.id == origin.snapshot_id:
                await self._remove(found)

    async def _fill_pass(self, volume: Volume, origin: Origin) -> bool:
        """Copy what the replicas lack; True once nothing was missing and the origin is
        dropped."""
        snapshot = await self.catalog.snapshot(origin.volume, origin.snapshot)
        if snapshot.id != origin.snapshot_id:
            raise SnapshotNotFound(name=origin.ref)
        servers = {s.id: s for s in await self.catalog.servers()}
        async with AsyncExitStack() as stack:
            reader = await snapshot_reader(snapshot, servers, self.access, stack)
            held = await reader.snapshot_diff(origin.volume_id, "", origin.snapshot_id)
            limit = min(origin.size, volume.size)
            held = [c for c in held if c * CHUNK_SIZE < limit]
            writers: dict[str, DataClient] = {}
            missing: dict[int, list[str]] = {}
            for replica in volume.replicas:
                if replica.server not in servers:
                    continue
                try:
                    client = await stack.enter_async_context(
                        ServerSession(servers[replica.server], self.access, copying=True))
                    # durable first: what this pass counts as filled must stay so
                    await self._flush(client, volume)
                    table = await client.generations(volume.id)
                except CargoholdError as e:
                    log.warning("clone %s: replica on %s not filled now: %s", volume.name,
                                replica.server, e)
                    continue
                writers[replica.server] = client
                for chunk in held:
                    if table[chunk * 8:chunk * 8 + 8] in (b"", bytes(8)):
                        missing.setdefault(chunk, []).append(replica.server)
            if not missing:
                if len(writers) < len(volume.replicas):
                    raise SnapshotFailed(name=volume.name, detail="a replica of the clone "
                                         "is out of reach: not known to be filled")
                return await self._done(volume, origin, writers)
            await self._copy(volume, origin, reader, writers, missing, len(held))
        return False

    async def _copy(self, volume: Volume, origin: Origin, reader: DataClient,
                    writers: dict[str, DataClient], missing: dict[int, list[str]],
                    total: int) -> None:
        pending = iter(sorted(missing))
        budget = Budget(self.rate)
        epoch = volume.epoch
        done = total - len(missing)
        reported = time.monotonic()

        async def copier() -> None:  # WINDOW of these keep chunks in flight
            nonlocal epoch, done, reported
            for chunk in pending:
                offset = chunk * CHUNK_SIZE
                length = min(CHUNK_SIZE, origin.size - offset, volume.size - offset)
                data = await reader.read_snapshot(origin.volume_id, SNAPSHOT_READS,
                                                  origin.snapshot_id, offset, length)
                await budget.spend(length)
                for sid in missing[chunk]:
                    try:
                        await writers[sid].fill(volume.id, epoch, offset, data,
                                                FILL_GENERATION)
                    except Fenced:  # attached (or detached) since: take the new epoch
                        epoch = (await self.catalog.volume(volume.name)).epoch
                        await writers[sid].fill(volume.id, epoch, offset, data,
                                                FILL_GENERATION)
                done += 1
                if time.monotonic() - reported >= PROGRESS_EVERY:
                    reported = time.monotonic()
                    await self._progress(volume.name, origin, done / total)

        await together([copier() for _ in range(WINDOW)])
        log.info("clone %s: %d chunks of %s filled", volume.name, len(missing), origin.ref)

    async def _progress(self, name: str, origin: Origin, done: float) -> None:
        def record(v: Volume) -> Volume | None:
            if v.origin != origin:
                return None
            v.filled = round(min(done, 0.999), 3)
            return v

        try:
            await self.catalog.update_volume(name, record)
        except CargoholdError as e:  # progress only: the fill goes on
            log.debug("clone %s: progress not recorded: %s", name, e)

    async def _flush(self, client: DataClient, volume: Volume) -> None:
        try:
            await client.flush(volume.id, volume.epoch)
        except Fenced:  # attached since
            await client.flush(volume.id, (await self.catalog.volume(volume.name)).epoch)

    async def _done(self, volume: Volume, origin: Origin,
                    writers: dict[str, DataClient]) -> bool:
        """Drop the origin (every replica was flushed, then found holding every chunk), if
        the record still names the replicas just checked."""
        checked = sorted(writers)

        def independent(v: Volume) -> Volume | None:
            if v.origin != origin or sorted(r.server for r in v.replicas) != checked:
                return None
            v.origin, v.filled = None, 1.0
            return v

        changed = await self.catalog.update_volume(volume.name, independent)
        if changed.origin is not None:
            return False  # replicas changed meanwhile: check again
        log.info("clone %s is filled: it no longer depends on %s", volume.name, origin.ref)
        return True

    async def _remove(self, snapshot: Snapshot) -> None:
        try:
            await self.snapshots.remove(snapshot.volume, snapshot.name)
        except CargoholdError as e:
            log.warning("snapshot %s taken for clone %s not removed yet: %s", snapshot.ref,
                        snapshot.for_clone, e)
