"""Clones and reverts: volumes made from snapshots, and volumes put back to one.

A clone is a new volume, placed like any other, whose replicas are filled with a snapshot's
data before anyone can attach it: each chunk is read from a replica that keeps the snapshot
and written to the clone's replicas, blocks of zeros left out (the clone is as thin as the
snapshot). Then it depends on nothing: the source and its snapshots may go. The clone keeps
the source's file system (not formatted again) and, when encrypted, its key. Cloning a
volume's current contents takes a snapshot first and removes it afterwards.

Reverting puts a detached volume back to one of its snapshots, on each in-sync replica in
place (``StoredReplica.revert``): only the blocks that differ are written back, with one
generation on every replica, so they stay alike; later snapshots keep what they hold.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import AsyncExitStack

from cargohold.clients.access import Access
from cargohold.clients.dataclient import DataClient
from cargohold.core.cipher import unwrap_key
from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE
from cargohold.core.models import DataServer, ReplicaState, Snapshot, SnapshotState, Volume
from cargohold.core.names import check_name, split_snapshot
from cargohold.core.sizes import format_size, volume_size
from cargohold.errors import (
    CargoholdError,
    InvalidArgument,
    ShrinkRefused,
    SnapshotFailed,
    VolumeBusy,
    VolumeInUse,
)
from cargohold.services.controller.resync import claim_detached
from cargohold.services.copies import WINDOW, together
from cargohold.services.snapshots import SnapshotService
from cargohold.services.volumes import ServerSession, VolumeService
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

#: A replica reads and rewrites all of itself in a revert: it answers within this.
REVERT_TIMEOUT = 3600.0


class CloneService:
    def __init__(self, catalog: Catalog, volumes: VolumeService, snapshots: SnapshotService,
                 access: Access | None = None) -> None:
        self.catalog = catalog
        self.volumes = volumes
        self.snapshots = snapshots
        self.access = access

    async def clone(self, name: str, source: str, size: str | int | None = None,
                    replicas: int | str | None = None, exist_ok: bool = False) -> Volume:
        """Create volume ``name`` from snapshot ``VOLUME@SNAPSHOT``, or from volume
        ``VOLUME``'s current contents. ``size`` (default: the snapshot's) may be larger;
        ``replicas`` defaults to the source's count."""
        check_name(name)
        if "@" in source:
            volume_name, snapshot_name = split_snapshot(source)
            return await self._from_snapshot(
                name, await self.catalog.snapshot(volume_name, snapshot_name), size, replicas,
                exist_ok)
        check_name(source)
        existing = await self.catalog.find_volume(name)
        if existing is not None and exist_ok and existing.source.startswith(f"{source}@"):
            return existing  # made from this volume before (the same request again)
        temporary = await self.snapshots.create(source, f"clone-{uuid.uuid4().hex[:12]}")
        try:
            return await self._from_snapshot(name, temporary, size, replicas, exist_ok)
        finally:
            await asyncio.shield(self.snapshots.remove(temporary.volume, temporary.name))

    async def _from_snapshot(self, name: str, snapshot: Snapshot, size: str | int | None,
                             replicas: int | str | None, exist_ok: bool) -> Volume:
        if snapshot.state is not SnapshotState.READY:
            raise VolumeBusy(name=snapshot.ref, state=snapshot.state.value)
        source = await self.catalog.volume(snapshot.volume)
        if source.id != snapshot.volume_id:
            raise SnapshotFailed(name=snapshot.ref, detail="its volume was replaced")
        size_bytes = volume_size(size) if size is not None else snapshot.size
        if size_bytes < snapshot.size:
            raise ShrinkRefused(name=name, size=format_size(size_bytes),
                                current=format_size(snapshot.size))
        key = None
        if source.encryption is not None:
            if self.access is None or not self.access.key:
                raise InvalidArgument(what="encryption", detail="cloning an encrypted volume "
                                      "needs the cluster key")
            key = unwrap_key(self.access.key, source.id, source.encryption["key"])
        servers = {s.id: s for s in await self.catalog.servers()}
        holders = [servers[sid] for sid in snapshot.servers if sid in servers]
        if not holders:
            raise SnapshotFailed(name=snapshot.ref, detail="no data server that keeps it is "
                                 "registered")

        async def fill(clone: Volume) -> None:
            await self._copy(snapshot, source, holders, clone, servers)

        return await self.volumes.create(
            name, size_bytes, replicas if replicas is not None else source.replica_count,
            source.fs, exist_ok=exist_ok, encrypt=key is not None, key=key,
            source=snapshot.ref, fill=fill)

    async def _copy(self, snapshot: Snapshot, source: Volume, holders: list[DataServer],
                    clone: Volume, servers: dict[str, DataServer]) -> None:
        """Copy every chunk of the snapshot that holds data into the clone's replicas."""
        epoch = source.attachment.epoch if source.attachment is not None else source.epoch
        generation = (clone.epoch << 32) + 1
        copied = 0
        reported = time.monotonic()
        async with AsyncExitStack() as stack:
            reader = await self._first_answering(holders, stack)
            writers = [await stack.enter_async_context(ServerSession(servers[r.server],
                                                                     self.access))
                       for r in clone.replicas]
            # only the chunks the snapshot holds data in (from the seqs, no data read)
            chunks = [c for c in await reader.snapshot_diff(source.id, "", snapshot.id)
                      if c * CHUNK_SIZE < snapshot.size]
            pending = iter(chunks)
            done = 0

            async def copier() -> None:  # WINDOW of these keep chunks in flight
                nonlocal copied, done, reported
                for chunk in pending:
                    offset = chunk * CHUNK_SIZE
                    length = min(CHUNK_SIZE, snapshot.size - offset)
                    data = await reader.read_snapshot(source.id, epoch, snapshot.id, offset,
                                                      length)
                    view = memoryview(data)
                    for at, run in _data_runs(view):
                        await asyncio.gather(*(w.write(clone.id, clone.epoch, offset + at,
                                                       view[at:at + run], generation)
                                               for w in writers))
                        copied += run
                    done += 1
                    if time.monotonic() - reported >= 1.0:  # for the CLI's progress bar
                        reported = time.monotonic()
                        await self._progress(clone.name, done / len(chunks))

            await together([copier() for _ in range(WINDOW)])
            await asyncio.gather(*(w.flush(clone.id, clone.epoch) for w in writers))
        log.info("clone %s of %s: %d bytes copied", clone.name, snapshot.ref, copied)

    async def _progress(self, name: str, done: float) -> None:
        def record(v: Volume) -> Volume:
            v.filled = round(done, 3)
            return v

        try:
            await self.catalog.update_volume(name, record)
        except CargoholdError as e:  # progress only: the copy goes on
            log.debug("clone %s: progress not recorded: %s", name, e)

    async def _first_answering(self, holders: list[DataServer],
                               stack: AsyncExitStack) -> DataClient:
        problems = []
        for server in holders:
            try:
                return await stack.enter_async_context(ServerSession(server, self.access))
            except CargoholdError as e:
                problems.append(f"{server.id}: {e}")
        raise SnapshotFailed(name="clone source", detail="; ".join(problems))

    async def revert(self, name: str, ref: str) -> Volume:
        """Put detached volume ``name`` back to its snapshot ``ref`` (VOLUME@SNAPSHOT)."""
        volume_name, snapshot_name = split_snapshot(ref)
        if volume_name != name:
            raise InvalidArgument(what="snapshot", detail=f"{ref} is not a snapshot of {name}")
        snapshot = await self.catalog.snapshot(volume_name, snapshot_name)
        if snapshot.state is not SnapshotState.READY:
            raise VolumeBusy(name=ref, state=snapshot.state.value)
        current = await self.catalog.volume(name)
        if current.attachment is not None:
            raise VolumeInUse(name=name, node=current.attachment.node)
        missing = [r.server for r in current.in_sync() if r.server not in snapshot.servers]
        if missing:
            raise SnapshotFailed(name=ref, detail=f"the in-sync replicas on {missing} do not "
                                 "keep it (rebuilt since): revert needs every one to")
        volume = await claim_detached(self.catalog, name, "a revert")
        servers = {s.id: s for s in await self.catalog.servers()}
        generation = (volume.epoch << 32) + 1
        targets = [r.server for r in volume.in_sync()]

        async def one(server_id: str) -> int:
            async with ServerSession(servers[server_id], self.access) as client:
                return await client.revert(volume.id, volume.epoch, snapshot.id, generation,
                                           timeout=REVERT_TIMEOUT)

        results = await asyncio.gather(*(one(sid) for sid in targets), return_exceptions=True)
        failed = {sid: str(r) for sid, r in zip(targets, results, strict=True)
                  if isinstance(r, BaseException)}
        if len(failed) == len(targets):
            raise SnapshotFailed(name=ref, detail=f"revert failed on every replica: {failed}")
        if failed:  # partly reverted: out of sync, resynced from a replica that made it
            def mark(v: Volume) -> Volume:
                for r in v.replicas:
                    if r.server in failed and r.state is ReplicaState.IN_SYNC:
                        r.state, r.reason = ReplicaState.OUT_OF_SYNC, (
                            f"revert to {ref} failed: {failed[r.server]}")
                return v

            await self.catalog.update_volume(name, mark)
        changed = max(r for r in results if isinstance(r, int))
        log.info("volume %s reverted to %s: %d bytes written back", name, ref, changed)
        return await self.catalog.volume(name)


def _data_runs(view: memoryview) -> list[tuple[int, int]]:
    """(offset, length) of the runs of blocks in ``view`` that are not all zeros."""
    found: list[tuple[int, int]] = []
    zero = bytes(BLOCK_SIZE)
    start = -1
    for at in range(0, len(view), BLOCK_SIZE):
        empty = view[at:at + BLOCK_SIZE] == zero
        if not empty and start < 0:
            start = at
        elif empty and start >= 0:
            found.append((start, at - start))
            start = -1
    if start >= 0:
        found.append((start, len(view) - start))
    return found
