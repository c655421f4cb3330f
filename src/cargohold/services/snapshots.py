"""Snapshots: take, list and remove point-in-time copies of volumes.

A snapshot's data lives in the volume's replicas (:mod:`cargohold.stores.versionmap`): taking
one copies nothing. Its record in the metadata store names it and the data servers that keep
it. An attached volume's snapshot is cut by its engine at one write barrier, with the mounted
file system frozen around it (:mod:`cargohold.services.engine.cutter`); this service asks
for it through the record and waits. A detached volume's is cut here, on each in-sync
replica, under a new epoch (no writer can come in between). Either way every replica in
sync keeps it, or none does and the record goes: a failure changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from cargohold.clients.access import Access
from cargohold.core.models import DataServer, Snapshot, SnapshotState, Volume, VolumeState
from cargohold.core.names import check_name
from cargohold.errors import (
    CargoholdError,
    CloneFilling,
    DataServerUnavailable,
    InvalidArgument,
    SnapshotExists,
    SnapshotFailed,
    SnapshotHasClones,
    SnapshotInGroup,
    TooManySnapshots,
    VolumeBusy,
)
from cargohold.services.controller.resync import claim_detached
from cargohold.services.volumes import ServerSession
from cargohold.stores.catalog import Catalog
from cargohold.stores.chunkstore import MAX_SNAPSHOTS

log = logging.getLogger(__name__)

#: How long a snapshot of an attached volume may take to cut (freezing a file system with
#: much dirty data writes all of it first).
CUT_TIMEOUT = 60.0
_POLL = 0.02


class SnapshotService:
    def __init__(self, catalog: Catalog, access: Access | None = None) -> None:
        self.catalog = catalog
        self.access = access

    async def create(self, volume: str, name: str, freeze: bool = True,
                     for_clone: str = "", handover: bool = False) -> Snapshot:
        """Take snapshot ``volume@name``. The same name again returns the snapshot taken
        before (idempotent, as CSI asks); it blocks until the snapshot is cut.
        ``for_clone``: the clone it is taken for (removed once that is filled).
        ``handover``: a migration's last point (the engine keeps the writes held after)."""
        check_name(volume)
        check_name(name)
        source = await self.catalog.volume(volume)
        existing = await self.catalog.find_snapshot(volume, name)
        if existing is not None:
            return await self._existing(existing, source)
        _check_whole(source)
        if len(await self.catalog.snapshots(volume)) >= MAX_SNAPSHOTS:
            raise TooManySnapshots(name=volume, count=MAX_SNAPSHOTS)
        if not source.in_sync():
            raise VolumeBusy(name=volume, state="without a replica in sync (nothing to cut)")
        att = source.attachment
        snapshot = Snapshot(id=uuid.uuid4().hex, name=name, volume=volume,
                            volume_id=source.id, size=source.size, freeze=freeze,
                            for_clone=for_clone, handover=handover)
        if att is not None and source.state is VolumeState.ATTACHED:
            snapshot.node, snapshot.epoch = att.node, att.epoch
            await self.catalog.add_snapshot(snapshot)
            return await self._await_cut(snapshot)
        if source.state is not VolumeState.DETACHED:
            raise VolumeBusy(name=volume, state=source.state.value)
        await self.catalog.add_snapshot(snapshot)
        try:
            return await self._cut_detached(snapshot)
        except BaseException:
            await asyncio.shield(self.catalog.remove_snapshot_if(
                snapshot, lambda s: s.id == snapshot.id))
            raise

    async def create_group(self, group: str, volumes: list[str],
                           freeze: bool = True) -> list[Snapshot]:
        """Snapshot ``volumes`` at one instant, each as ``VOLUME@group``: the engines of the
        attached ones each hold their writes, and once all hold, each cuts (the detached
        ones have no writer: they are cut meanwhile). Idempotent by name, as ``create``;
        all are taken or none is kept."""
        check_name(group)
        for name in volumes:
            check_name(name)
        if not volumes or len(set(volumes)) != len(volumes):
            raise InvalidArgument(what="volumes", detail="name each volume once")
        existing = [s for s in await self.catalog.snapshots() if s.group == group]
        if existing:
            if sorted(s.volume for s in existing) != sorted(volumes):
                raise SnapshotExists(name=f"group {group}")
            return [await self._existing(s, await self.catalog.volume(s.volume))
                    for s in existing]
        sources = [await self.catalog.volume(name) for name in volumes]
        for source in sources:
            if await self.catalog.find_snapshot(source.name, group) is not None:
                raise SnapshotExists(name=f"{source.name}@{group}")
            _check_whole(source)
            if not source.in_sync():
                raise VolumeBusy(name=source.name, state="without a replica in sync")
            if source.state not in (VolumeState.ATTACHED, VolumeState.DETACHED):
                raise VolumeBusy(name=source.name, state=source.state.value)
        members: list[Snapshot] = []
        detached: list[Snapshot] = []
        created = time.time()
        try:
            for source in sources:
                member = Snapshot(id=uuid.uuid4().hex, name=group, volume=source.name,
                                  volume_id=source.id, size=source.size, freeze=freeze,
                                  group=group, group_size=len(sources), created=created)
                att = source.attachment
                if att is not None:
                    member.node, member.epoch = att.node, att.epoch
                else:
                    detached.append(member)
                await self.catalog.add_snapshot(member)
                members.append(member)
            for member in detached:  # no writer: any moment is the group's instant
                await self._cut_detached(member)
            done = [await self._await_cut(m) for m in members]
        except BaseException as e:
            log.error("group snapshot %s failed, rolling back: %s", group, e)
            await asyncio.shield(self._give_up(members))
            if isinstance(e, CargoholdError) and not isinstance(e, SnapshotFailed):
                raise SnapshotFailed(name=f"group {group}", detail=str(e)) from e
            raise
        log.info("group snapshot %s of %s taken", group, volumes)
        return done

    async def _give_up(self, members: list[Snapshot]) -> None:
        """Undo a group snapshot: fail what is still being cut, remove what was cut."""
        def failed(s: Snapshot) -> Snapshot | None:
            if s.state is not SnapshotState.CUTTING:
                return None
            s.state, s.error = SnapshotState.FAILED, "the group snapshot was given up"
            return s

        for member in members:
            await self.catalog.update_snapshot(member.volume, member.name, failed)
        for member in members:
            now = await self.catalog.find_snapshot(member.volume, member.name)
            if now is None or now.id != member.id:
                continue
            try:
                if now.state is SnapshotState.READY:
                    await self.remove(member.volume, member.name, group_ok=True)
                else:
                    await self.catalog.remove_snapshot_if(now, partial(_is, member.id))
            except CargoholdError as e:
                log.warning("group snapshot member %s left: %s", member.ref, e)

    async def remove_group(self, group: str) -> int:
        """Remove every snapshot of group ``group``; return how many."""
        check_name(group)
        members = [s for s in await self.catalog.snapshots() if s.group == group]
        for member in members:
            await self.remove(member.volume, member.name, group_ok=True)
        return len(members)

    async def _existing(self, snapshot: Snapshot, source: Volume) -> Snapshot:
        if snapshot.volume_id != source.id:
            raise SnapshotExists(name=snapshot.ref)  # of an older volume of that name
        if snapshot.state is SnapshotState.CUTTING:
            return await self._await_cut(snapshot)
        if snapshot.state is not SnapshotState.READY:
            raise VolumeBusy(name=snapshot.ref, state=snapshot.state.value)
        return snapshot

    async def _await_cut(self, snapshot: Snapshot) -> Snapshot:
        """Wait for the engine to cut ``snapshot``; give up (and remove the request) after
        ``CUT_TIMEOUT``."""
        deadline = time.monotonic() + CUT_TIMEOUT
        while True:
            now = await self.catalog.find_snapshot(snapshot.volume, snapshot.name)
            if now is None or now.id != snapshot.id:
                raise SnapshotFailed(name=snapshot.ref, detail="its record went away")
            if now.state is SnapshotState.READY:
                return now
            if now.state is SnapshotState.FAILED:
                await self.catalog.remove_snapshot_if(now, lambda s: s.id == snapshot.id)
                raise SnapshotFailed(name=snapshot.ref, detail=now.error)
            if time.monotonic() > deadline and await self.catalog.remove_snapshot_if(
                    now, lambda s: s.id == snapshot.id and s.state is SnapshotState.CUTTING):
                raise SnapshotFailed(name=snapshot.ref, detail=(
                    f"the engine on node {now.node!r} did not cut it within "
                    f"{CUT_TIMEOUT:g} s"))
            await asyncio.sleep(_POLL)

    async def _cut_detached(self, snapshot: Snapshot) -> Snapshot:
        volume = await claim_detached(self.catalog, snapshot.volume, "a snapshot")
        servers = {s.id: s for s in await self.catalog.servers()}
        holders = [servers[r.server] for r in volume.in_sync() if r.server in servers]
        if len(holders) < len(volume.in_sync()):
            raise SnapshotFailed(name=snapshot.ref, detail="a data server of an in-sync "
                                 "replica is not registered")
        done: list[DataServer] = []
        try:
            for server in holders:
                async with ServerSession(server, self.access) as client:
                    await client.snapshot(volume.id, volume.epoch, snapshot.id,
                                          snapshot.created)
                done.append(server)
        except CargoholdError as e:
            await self._forget(volume.id, volume.epoch, snapshot.id, done)
            raise SnapshotFailed(name=snapshot.ref, detail=str(e)) from e

        def ready(s: Snapshot) -> Snapshot | None:
            if s.id != snapshot.id:
                return None
            s.state, s.servers, s.epoch = SnapshotState.READY, [h.id for h in holders], 0
            return s

        recorded = await self.catalog.update_snapshot(snapshot.volume, snapshot.name, ready)
        if recorded is None or recorded.state is not SnapshotState.READY:
            await self._forget(volume.id, volume.epoch, snapshot.id, done)
            raise SnapshotFailed(name=snapshot.ref, detail="its record went away")
        return recorded

    async def _forget(self, volume_id: str, epoch: int, snapshot_id: str,
                      servers: list[DataServer]) -> list[str]:
        """Delete a snapshot on ``servers`` (all at once: each flushes first); return the
        ids of those that did not answer."""
        async def forget(server: DataServer) -> str | None:
            try:
                async with ServerSession(server, self.access) as client:
                    await client.delete_snapshot(volume_id, epoch, snapshot_id)
            except CargoholdError as e:
                log.warning("snapshot %s on %s not deleted: %s", snapshot_id, server.id, e)
                return server.id
            return None

        return [sid for sid in await asyncio.gather(*map(forget, servers)) if sid]

    async def remove(self, volume: str, name: str, group_ok: bool = False) -> None:
        """Remove snapshot ``volume@name`` and free the space only it held. A member of a
        group snapshot goes with its group only (``group_ok``: the group is going)."""
        snapshot = await self.catalog.snapshot(volume, name)
        if snapshot.state is SnapshotState.CUTTING:
            raise VolumeBusy(name=snapshot.ref, state="being cut")
        if snapshot.group and not group_ok:
            raise SnapshotInGroup(name=snapshot.ref, group=snapshot.group)

        await self.catalog.update_snapshot(volume, name,
                                           _to_state(snapshot.id, SnapshotState.DELETING))
        # after marking it (a clone made meanwhile checks the mark after its record exists)
        clones = [v.name for v in await self.catalog.volumes()
                  if v.origin is not None and v.origin.snapshot_id == snapshot.id]
        if clones:
            await self.catalog.update_snapshot(volume, name,
                                               _to_state(snapshot.id, SnapshotState.READY))
            raise SnapshotHasClones(name=snapshot.ref, clones=", ".join(clones))
        source = await self.catalog.find_volume(volume)
        left: list[str] = []
        if source is not None and source.id == snapshot.volume_id and snapshot.servers:
            epoch = source.attachment.epoch if source.attachment is not None else source.epoch
            servers = {s.id: s for s in await self.catalog.servers()}
            left = [sid for sid in snapshot.servers if sid not in servers]
            left += await self._forget(source.id, epoch, snapshot.id,
                                       [servers[sid] for sid in snapshot.servers
                                        if sid in servers])
        if left:
            def remaining(s: Snapshot) -> Snapshot | None:
                if s.id != snapshot.id:
                    return None
                s.servers = left
                return s

            await self.catalog.update_snapshot(volume, name, remaining)
            raise DataServerUnavailable(server=", ".join(left), address="?",
                                        detail=f"snapshot {snapshot.ref} is still kept there; "
                                               "remove it again once they answer")
        await self.catalog.remove_snapshot_if(snapshot, lambda s: s.id == snapshot.id)
        log.info("snapshot %s removed", snapshot.ref)

    async def usage(self, snapshots: list[Snapshot]) -> dict[str, int | None]:
        """Per snapshot id, the bytes only it holds (on one replica; None: no answer)."""
        servers = {s.id: s for s in await self.catalog.servers()}
        found: dict[str, int | None] = {s.id: None for s in snapshots}
        asked: set[tuple[str, str]] = set()
        for snapshot in snapshots:
            if found[snapshot.id] is not None:
                continue
            for sid in snapshot.servers:
                if sid not in servers or (sid, snapshot.volume_id) in asked:
                    continue
                asked.add((sid, snapshot.volume_id))
                try:
                    async with ServerSession(servers[sid], self.access) as client:
                        kept = await client.snapshots(snapshot.volume_id)
                except CargoholdError:
                    continue
                for info in kept:
                    if info.get("id") in found:
                        found[info["id"]] = int(info["unique"])
                break
        return found


def _to_state(snapshot_id: str, state: SnapshotState) -> Callable[[Snapshot],
                                                                   Snapshot | None]:
    """The change that puts snapshot ``snapshot_id``'s record (not a newer namesake's) in
    ``state``."""
    def change(s: Snapshot) -> Snapshot | None:
        if s.id != snapshot_id:
            return None
        s.state = state
        return s

    return change


def _check_whole(volume: Volume) -> None:
    """A clone still filling has chunks only its source holds, a volume being restored
    blocks not written yet: a snapshot would miss them."""
    if volume.origin is not None:
        raise CloneFilling(name=volume.name, source=volume.origin.ref,
                           done=f"{volume.filled:.0%}", what="taking snapshots of it")
    if volume.restoring:
        raise VolumeBusy(name=volume.name, state=f"being restored from backup "
                         f"{volume.restoring}")


def _is(snapshot_id: str, snapshot: Snapshot) -> bool:
    return snapshot.id == snapshot_id


def snapshot_view(snapshot: Snapshot, unique: int | None = None) -> dict[str, Any]:
    """What the API and CLI show of a snapshot."""
    view = snapshot.model_dump(mode="json", exclude={"node", "epoch", "freeze"})
    view["ref"] = snapshot.ref
    view["unique"] = unique
    return view
