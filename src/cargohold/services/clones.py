"""Clones and reverts: volumes made from snapshots, and volumes put back to one.

A clone is a new volume, placed like any other, that can be attached and written at once:
its record names its *origin*, the source snapshot, which its engine reads what its replicas
lack from (:mod:`cargohold.services.engine.origin`) while the controller fills them in the
background (:mod:`cargohold.services.controller.fill`), blocks of zeros left out (the clone
is as thin as the snapshot). Once filled it depends on nothing; until then the snapshot
cannot be removed. The clone keeps the source's file system (not formatted again) and,
when encrypted, its key. Cloning a volume's current contents takes a snapshot for it,
removed once the clone is filled.

Reverting puts a detached volume back to one of its snapshots, on each in-sync replica in
place (``StoredReplica.revert``): only the blocks that differ are written back, with one
generation on every replica, so they stay alike; later snapshots keep what they hold.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from cargohold.clients.access import Access
from cargohold.core.cipher import unwrap_key
from cargohold.core.models import Origin, ReplicaState, Snapshot, SnapshotState, Volume
from cargohold.core.names import check_name, split_snapshot
from cargohold.core.sizes import format_size, volume_size
from cargohold.errors import (
    InvalidArgument,
    ShrinkRefused,
    SnapshotFailed,
    VolumeBusy,
    VolumeInUse,
)
from cargohold.services.controller.resync import claim_detached
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
        ``VOLUME``'s current contents (a snapshot taken for it, removed once it is filled).
        ``size`` (default: the snapshot's) may be larger; ``replicas`` defaults to the
        source's count. The clone is usable at once; it fills in the background."""
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
        temporary = await self.snapshots.create(source, f"clone-{uuid.uuid4().hex[:12]}",
                                                for_clone=name)
        try:
            return await self._from_snapshot(name, temporary, size, replicas, exist_ok,
                                             temporary=True)
        except BaseException:
            await asyncio.shield(self.snapshots.remove(temporary.volume, temporary.name))
            raise

    async def _from_snapshot(self, name: str, snapshot: Snapshot, size: str | int | None,
                             replicas: int | str | None, exist_ok: bool,
                             temporary: bool = False) -> Volume:
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
        if not snapshot.servers:
            raise SnapshotFailed(name=snapshot.ref, detail="no data server keeps it")
        origin = Origin(volume=snapshot.volume, volume_id=snapshot.volume_id,
                        snapshot=snapshot.name, snapshot_id=snapshot.id, size=snapshot.size,
                        temporary=temporary)
        clone = await self.volumes.create(
            name, size_bytes, replicas if replicas is not None else source.replica_count,
            source.fs, exist_ok=exist_ok, encrypt=key is not None, key=key,
            source=snapshot.ref, origin=origin)
        # The snapshot may have been marked for removal while the clone's record was made;
        # a removal checks for clones after marking it, so one of us sees the other.
        now = await self.catalog.find_snapshot(snapshot.volume, snapshot.name)
        if now is None or now.id != snapshot.id or now.state is not SnapshotState.READY:
            await asyncio.shield(self.volumes.remove(name))
            raise VolumeBusy(name=snapshot.ref, state="being removed")
        log.info("volume %s cloned from %s: it fills in the background", name, snapshot.ref)
        return clone

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
