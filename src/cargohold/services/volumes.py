"""Volume lifecycle: create (placement + replicas), resize, remove, list, inspect.

A create either finishes with every replica made, or leaves nothing: replicas already made
are deleted again and the record is removed. A replica that cannot be deleted because its
data server is unreachable is written down as garbage and deleted by
:meth:`VolumeService.collect_garbage` once the server answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from array import array
from typing import Any

from cargohold.clients import kernel
from cargohold.clients.access import Access
from cargohold.clients.dataclient import CONTROL_TIMEOUT, DataClient
from cargohold.core import placement
from cargohold.core.cipher import CIPHER, new_key, read_key, wrap_key
from cargohold.core.layout import generation_table
from cargohold.core.models import (
    DataServer,
    Locality,
    Origin,
    Replica,
    ReplicaState,
    Snapshot,
    SnapshotState,
    Volume,
    VolumeState,
)
from cargohold.core.names import check_name
from cargohold.core.retry import Backoff, retry
from cargohold.core.sizes import format_size, volume_size
from cargohold.core.wire import LOCAL_SOCKET
from cargohold.errors import (
    CargoholdError,
    ConcurrentUpdate,
    DataServerUnavailable,
    InvalidArgument,
    InvalidFilesystem,
    InvalidLocality,
    InvalidReplicas,
    NoReplicaLeft,
    NothingToSalvage,
    OwnerAlive,
    ReplicaNotFound,
    ShrinkRefused,
    VolumeBusy,
    VolumeExists,
    VolumeHasSnapshots,
    VolumeInUse,
    VolumeNotFound,
)
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

MAX_REPLICAS = 5
#: An identical create that finds the volume being created waits this long for it.
CREATE_WAIT = Backoff(first=0.05, most=0.05, timeout=30.0)
#: A record still *creating* this long after it was made belongs to a create that died.
ABANDONED_AFTER = 300.0
#: A snapshot record still being cut this long after it was made was given up by its asker
#: (which waits 60 s at most).
STALE_CUT = 300.0


#: Seconds a volume's measured use is reused by ``recent_use``.
USE_MAX_AGE = 30.0

class VolumeService:
    def __init__(self, catalog: Catalog, access: Access | None = None) -> None:
        """``access``: how this node uses data servers (TLS, capabilities); None: in the
        clear, as in-process tests do."""
        self.catalog = catalog
        self.access = access
        self._used: dict[str, tuple[float, int | None]] = {}  # volume id → (when, bytes)

    async def create(self, name: str, size: str | int, replicas: int | str = 2,
                     fs: str = "ext4", exist_ok: bool = False, encrypt: bool = False,
                     key: bytes | None = None, source: str = "",
                     origin: Origin | None = None, restoring: str = "",
                     locality: str = Locality.BEST_EFFORT) -> Volume:
        """Create a thin volume; with ``exist_ok`` an identical existing volume is returned.
        ``encrypt``: encrypted at rest by its engines, with ``key`` (64 bytes) or a new
        random one, kept in the metadata store only wrapped under the cluster key.
        ``origin``: a clone's source snapshot (``source`` names it), which it reads from
        until the controller filled it (see :mod:`cargohold.services.clones`).
        ``restoring``: the backup it is restored from (not attachable until it is)."""
        check_name(name)
        encrypt = encrypt or key is not None
        if encrypt and (self.access is None or not self.access.key):
            raise InvalidArgument(what="encryption", detail="needs the cluster key: a node "
                                  "with TLS credentials (not --insecure-plaintext)")
        size_bytes = volume_size(size)
        count = _replica_count(replicas)
        wanted = locality_of(locality)
        if fs not in kernel.FILESYSTEMS:
            raise InvalidFilesystem(fs=fs, detail=f"choose one of {', '.join(kernel.FILESYSTEMS)}")
        if fs == "xfs" and size_bytes < kernel.MIN_XFS_SIZE:
            raise InvalidFilesystem(fs=fs, detail=f"xfs needs at least "
                                    f"{format_size(kernel.MIN_XFS_SIZE)}")
        existing = await self.catalog.find_volume(name)
        if existing is not None:
            return await self._existing(existing, size_bytes, count, fs, exist_ok, encrypt)
        chosen = placement.place(await self.catalog.servers_for_placement(), count, size_bytes,
                                 exclude=await self.catalog.draining_servers())
        volume = Volume(id=uuid.uuid4().hex, name=name, size=size_bytes, replica_count=count,
                        fs=fs, replicas=[Replica(server=s.id) for s in chosen],
                        source=source, formatted=bool(source), origin=origin,
                        restoring=restoring, locality=wanted,
                        epoch=1 if origin is not None else 0)  # a fill writes at once
        if encrypt:
            assert self.access is not None
            volume.encryption = {"cipher": CIPHER, "key": wrap_key(
                self.access.key, volume.id, read_key(key) if key is not None else new_key())}
        try:
            await self.catalog.add_volume(volume)
        except VolumeExists:
            if not exist_ok:
                raise
            return await self._existing(await self.catalog.volume(name), size_bytes, count, fs,
                                        exist_ok, encrypt)
        asked: list[DataServer] = []  # a replica may exist where no answer came
        try:
            for server in chosen:
                asked.append(server)
                async with ServerSession(server, self.access) as client:
                    await client.create(volume.id, size_bytes)
        except BaseException as e:  # a refusal, a bug, or the node stopping: leave nothing
            log.error("create of %s failed, rolling back: %s", name,
                      "interrupted" if isinstance(e, asyncio.CancelledError) else e)
            await asyncio.shield(self._abandon(volume, asked))  # even when cancelled
            raise

        def ready(v: Volume) -> Volume:
            v.state = VolumeState.DETACHED
            return v

        return await self.catalog.update_volume(name, ready)

    async def _existing(self, volume: Volume, size: int, count: int, fs: str,
                        exist_ok: bool, encrypt: bool) -> Volume:
        if not exist_ok or (volume.size, volume.replica_count, volume.fs,
                            volume.encryption is not None) != (size, count, fs, encrypt):
            raise VolumeExists(name=volume.name)
        if volume.state is not VolumeState.CREATING:
            return volume
        name = volume.name

        async def created() -> Volume:  # a concurrent create of the same volume is finishing
            found = await self.catalog.find_volume(name)
            if found is None:
                raise VolumeNotFound(name=name)
            if found.state is VolumeState.CREATING:
                raise VolumeBusy(name=name, state=found.state.value)
            return found

        try:
            return await retry(created, CREATE_WAIT, what=f"waiting for volume {name!r}",
                               temporary=lambda e: isinstance(e, VolumeBusy))
        except VolumeNotFound:
            raise VolumeBusy(name=name, state="being created and failed") from None

    async def remove(self, name: str) -> None:
        kept = await self.catalog.snapshots(name)
        if kept:
            raise VolumeHasSnapshots(name=name, count=len(kept))

        def deleting(v: Volume) -> Volume:
            if v.attachment is not None:
                raise VolumeInUse(name=name, node=v.attachment.node)
            if v.state is VolumeState.CREATING:
                raise VolumeBusy(name=name, state=v.state.value)
            v.state = VolumeState.DELETING
            return v

        volume = await self.catalog.update_volume(name, deleting)
        servers = {s.id: s for s in await self.catalog.servers()}
        holders = [servers[r.server] for r in volume.replicas if r.server in servers]
        await self._delete_replicas(volume.id, holders)
        for replica in volume.replicas:
            if replica.server not in servers:
                await self.catalog.add_garbage(replica.server, volume.id)
        await self.catalog.remove_volume(name)

    async def release(self, name: str) -> Volume:
        """Force-detach ``name`` from a node that is down (an operator's ``detach --force``).

        Refused while the owner's lease is alive. The release issues a new epoch and fences
        every reachable replica with it, so an engine the dead node may still run somewhere
        cannot write any more, even before the volume is attached again.
        """
        volume = await self.catalog.volume(name)
        if volume.attachment is None:
            return volume
        owner = volume.attachment.node
        if await self.catalog.node_alive(owner):
            raise OwnerAlive(name=name, node=owner)

        def released(v: Volume) -> Volume:
            if v.attachment is None or v.attachment.node != owner:
                raise VolumeBusy(name=name, state=v.state.value)
            v.epoch += 1
            v.state = VolumeState.DETACHED
            v.attachment = None
            v.last_error = f"force-detached from node {owner}, which was down"
            return v

        volume = await self.catalog.update_volume(name, released)
        log.warning("volume %s force-detached from node %s; replicas fenced at epoch %d",
                    name, owner, volume.epoch)
        servers = {s.id: s for s in await self.catalog.servers()}
        for replica in volume.replicas:
            if replica.server not in servers:
                continue
            try:
                async with ServerSession(servers[replica.server], self.access) as client:
                    await client.fence(volume.id, volume.epoch)
            except CargoholdError as e:  # it learns the epoch from the next engine instead
                log.warning("could not fence %s on %s: %s", name, replica.server, e)
        return volume

    async def salvage(self, name: str) -> dict[str, Any]:
        """Bring back detached volume ``name`` when no replica is in sync any more (each copy
        failed in turn): the copy that took the newest write (highest chunk generation)
        becomes in sync; the others are then resynced from it by the controller.

        Refused while attached or while some replica is still in sync. Copies that do not
        answer are left out; the answer says which, and how many chunks another copy holds
        a newer generation of (writes that were never acknowledged, or a copy that was
        unreachable)."""
        volume = await self.catalog.volume(name)
        if volume.attachment is not None:
            raise VolumeInUse(name=name, node=volume.attachment.node)
        if volume.in_sync():
            raise NothingToSalvage(name=name, server=volume.in_sync()[0].server)
        servers = {s.id: s for s in await self.catalog.servers()}
        tables: dict[str, array[int]] = {}
        unreachable = []
        for replica in volume.replicas:
            server = servers.get(replica.server)
            try:
                if server is None:
                    raise DataServerUnavailable(server=replica.server, address="-",
                                                detail="not registered")
                async with ServerSession(server, self.access) as client:
                    tables[replica.server] = generation_table(
                        await client.generations(volume.id, timeout=10.0))
            except CargoholdError as e:
                log.warning("salvage of %s: copy on %s left out: %s", name, replica.server, e)
                unreachable.append(replica.server)
        if not tables:
            raise NoReplicaLeft(name=name)
        best = max(tables, key=lambda sid: max(tables[sid], default=0))
        newer = sum(1 for chunk, gen in enumerate(tables[best])
                    if any(chunk < len(t) and t[chunk] > gen for t in tables.values()))

        def salvaged(v: Volume) -> Volume:
            if v.attachment is not None or v.in_sync() or v.state is not VolumeState.DETACHED:
                raise VolumeBusy(name=name, state=f"{v.state.value} (changed during the salvage)")
            for replica in v.replicas:
                if replica.server == best:
                    replica.state, replica.progress = ReplicaState.IN_SYNC, 0.0
                    replica.reason = "salvaged: it holds the newest writes"
            return v

        await self.catalog.update_volume(name, salvaged)
        log.warning("volume %s salvaged: the copy on %s is in sync again (%d chunks newer "
                    "elsewhere, unreachable: %s)", name, best, newer, unreachable or "none")
        return {"name": name, "in_sync": best, "chunks_newer_elsewhere": newer,
                "unreachable": unreachable}

    async def resize(self, name: str, size: str | int) -> Volume:
        """Grow ``name`` to ``size`` (rounded up to whole MiB); return the updated record.

        Volumes only grow: a smaller size raises ``ShrinkRefused`` and the same size changes
        nothing. Every replica (in sync or not) is grown on its data server first; only when
        all of them grew is the new size written to the record (a CAS that also re-checks
        the size), so a failure half way leaves the record at the old size and replicas that
        may be larger than it, which is harmless (engines address only the recorded size).
        Like create, nothing is reserved on the data servers: volumes are thin.

        An attached volume's engine, loop device and file system learn the new size from
        the agent of the node it is attached on (``Agent.expand``); this only grows the
        replicas and the record.
        """
        size_bytes = volume_size(size)
        volume = await self.catalog.volume(name)
        _check_growth(volume, size_bytes)
        if size_bytes == volume.size:
            return volume
        servers = {s.id: s for s in await self.catalog.servers()}
        for replica in volume.replicas:
            server = servers.get(replica.server)
            if server is None:
                raise DataServerUnavailable(server=replica.server, address="?",
                                            detail="it is not registered; the volume cannot "
                                                   "grow until every replica can")
            async with ServerSession(server, self.access) as client:
                grown = await client.resize(volume.id, size_bytes)
            if grown < size_bytes:
                raise CargoholdError(detail=f"data server {server.id} grew replica {volume.id} "
                                            f"to {grown} bytes, not {size_bytes}")

        def grown_record(v: Volume) -> Volume | None:
            if v.id != volume.id:
                raise VolumeBusy(name=name, state="replaced while it was resized")
            _check_growth(v, size_bytes)
            if {r.server for r in v.replicas} - {r.server for r in volume.replicas}:
                raise ConcurrentUpdate(what=f"the replicas of volume {name!r}")
            if v.size == size_bytes:
                return None
            v.size = size_bytes
            return v

        updated = await self.catalog.update_volume(name, grown_record)
        log.info("volume %s grew from %s to %s", name, format_size(volume.size),
                 format_size(size_bytes))
        return updated

    async def set_locality(self, name: str, locality: str) -> Volume:
        """Change where ``name``'s data should be when attached (the controller acts on it;
        ``strict`` is checked at the next attach)."""
        wanted = locality_of(locality)

        def change(v: Volume) -> Volume:
            v.locality = wanted
            return v

        return await self.catalog.update_volume(name, change)

    async def set_replicas(self, name: str, replicas: int | str) -> Volume:
        """Change how many replicas ``name`` keeps, attached or not, never going below the
        smaller count: new replicas are placed, created empty and added out of sync (the
        engine, or the controller's resync when detached, fills them, snapshots first);
        fewer drops the replicas out of sync first, then the others past the count."""
        count = _replica_count(replicas)
        volume = await self.catalog.volume(name)
        if volume.state not in (VolumeState.DETACHED, VolumeState.ATTACHED):
            raise VolumeBusy(name=name, state=volume.state.value)
        if any(r.replaces for r in volume.replicas):
            raise VolumeBusy(name=name, state="having a replica rebuilt")
        if count > len(volume.replicas):
            return await self._add_replicas(volume, count)
        in_sync = [r for r in volume.replicas if r.state is ReplicaState.IN_SYNC]
        rest = [r for r in volume.replicas if r.state is not ReplicaState.IN_SYNC]
        keep = (in_sync + rest)[:count]
        dropped = [r.server for r in volume.replicas if r not in keep]

        def shrink(v: Volume) -> Volume:
            if v.id != volume.id or [r.server for r in v.replicas] != [
                    r.server for r in volume.replicas]:
                raise VolumeBusy(name=name, state="changed meanwhile; try again")
            v.replicas = [r for r in v.replicas if r.server not in dropped]
            v.replica_count = count
            return v

        updated = await self.catalog.update_volume(name, shrink)
        if dropped:
            await self.catalog.hold_snapshots(name, drop=dropped)
            servers = {s.id: s for s in await self.catalog.servers()}
            await self._delete_replicas(volume.id, [servers[s] for s in dropped if s in servers])
            for server_id in dropped:
                if server_id not in servers:
                    await self.catalog.add_garbage(server_id, volume.id)
            log.info("volume %s keeps %d replicas: dropped %s", name, count, dropped)
        return updated

    async def _add_replicas(self, volume: Volume, count: int) -> Volume:
        exclude = {r.server for r in volume.replicas} | await self.catalog.draining_servers()
        chosen = placement.place(await self.catalog.servers_for_placement(),
                                 count - len(volume.replicas), volume.size, exclude=exclude)
        made: list[DataServer] = []
        try:
            for server in chosen:
                made.append(server)
                async with ServerSession(server, self.access) as client:
                    await client.create(volume.id, volume.size)

            def grow(v: Volume) -> Volume:
                if v.id != volume.id or len(v.replicas) != len(volume.replicas):
                    raise VolumeBusy(name=volume.name, state="changed meanwhile; try again")
                v.replicas += [Replica(server=s.id, state=ReplicaState.OUT_OF_SYNC,
                                       reason=f"added: {count} replicas asked")
                               for s in chosen]
                v.replica_count = count
                return v

            updated = await self.catalog.update_volume(volume.name, grow)
        except BaseException:
            await asyncio.shield(self._delete_replicas(volume.id, made))
            raise
        log.info("volume %s: %d replicas added, to be filled", volume.name, len(chosen))
        return updated

    async def _delete_replicas(self, volume_id: str, servers: list[DataServer]) -> None:
        for server in servers:
            try:
                async with ServerSession(server, self.access) as client:
                    await client.delete(volume_id)
            except ReplicaNotFound:
                pass  # never made there, or gone already
            except CargoholdError as e:
                log.warning("replica %s on %s left for later deletion: %s", volume_id,
                            server.id, e)
                await self.catalog.add_garbage(server.id, volume_id)

    async def _abandon(self, volume: Volume, servers: list[DataServer]) -> None:
        """Undo a create: delete its replicas (or leave them to the garbage collector) and
        its record, unless another create made the record its own meanwhile."""
        await self._delete_replicas(volume.id, servers)
        await self.catalog.remove_volume_if(volume.name, volume.id, VolumeState.CREATING)

    async def collect_abandoned(self, older_than: float = ABANDONED_AFTER) -> list[str]:
        """Roll back creates that never finished (the node that ran one died half way): a
        record still *creating* ``older_than`` seconds after it was made. Return the names."""
        servers = {s.id: s for s in await self.catalog.servers()}
        rolled_back = []
        for volume in await self.catalog.volumes():
            if (volume.state is VolumeState.CREATING
                    and time.time() - volume.created > older_than):
                log.warning("volume %s was never finished being created (since %.0f s): "
                            "rolling it back", volume.name, time.time() - volume.created)
                holders = [servers[r.server] for r in volume.replicas if r.server in servers]
                for replica in volume.replicas:
                    if replica.server not in servers:
                        await self.catalog.add_garbage(replica.server, volume.id)
                await self._abandon(volume, holders)
                rolled_back.append(volume.name)
        return rolled_back

    async def collect_garbage(self) -> int:
        """Delete replicas left behind by removals; return how many were deleted."""
        servers = {s.id: s for s in await self.catalog.servers()}
        deleted = 0
        for server_id, volume_id in await self.catalog.garbage():
            server = servers.get(server_id)
            if server is None:
                continue
            try:
                async with ServerSession(server, self.access) as client:
                    await client.delete(volume_id)
            except ReplicaNotFound:
                pass  # gone already: nothing left to collect
            except CargoholdError:
                continue
            await self.catalog.drop_garbage(server_id, volume_id)
            deleted += 1
        return deleted

    async def collect_stale_snapshots(self, older_than: float = STALE_CUT) -> list[str]:
        """Remove snapshot records whose cut was never finished nor given up (their asker
        died: a request still *cutting*, or *failed*, ``older_than`` seconds after it was
        made), forgetting the snapshot on the volume's replicas too (a cut may have reached
        some). Return their names."""
        removed = []
        servers = {s.id: s for s in await self.catalog.servers()}
        for snapshot in await self.catalog.snapshots():
            if snapshot.state not in (SnapshotState.CUTTING, SnapshotState.FAILED) \
                    or time.time() - snapshot.created < older_than:
                continue
            volume = await self.catalog.find_volume(snapshot.volume)
            if volume is not None and volume.id == snapshot.volume_id:
                epoch = volume.attachment.epoch if volume.attachment else volume.epoch
                for replica in volume.replicas:
                    server = servers.get(replica.server)
                    if server is None or not epoch:
                        continue
                    try:
                        async with ServerSession(server, self.access) as client:
                            await client.delete_snapshot(volume.id, epoch, snapshot.id)
                    except CargoholdError as e:
                        log.warning("stale snapshot %s left on %s: %s", snapshot.ref,
                                    server.id, e)
            def same(s: Snapshot, known: str = snapshot.id) -> bool:
                return s.id == known

            if await self.catalog.remove_snapshot_if(snapshot, same):
                log.warning("snapshot %s was never finished (%s since %.0f s): removed",
                            snapshot.ref, snapshot.state.value, time.time() - snapshot.created)
                removed.append(snapshot.ref)
        return removed

    async def usage(self, volume: Volume) -> dict[str, Any]:
        """Bytes each replica really takes on disk (thin: written blocks only)."""
        servers = {s.id: s for s in await self.catalog.servers()}
        used: dict[str, Any] = {}
        for replica in volume.replicas:
            server = servers.get(replica.server)
            if server is None:
                used[replica.server] = None
                continue
            try:
                async with ServerSession(server, self.access) as client:
                    used[replica.server] = int((await client.stat(volume.id))["used"])
            except CargoholdError:
                used[replica.server] = None
        return used


    async def recent_use(self, volumes: list[Volume], max_age: float = USE_MAX_AGE
                         ) -> dict[str, int | None]:
        """Bytes each volume's fullest replica takes, by name (None: no replica answered),
        measured again once ``max_age`` seconds passed: for lists, metrics and the
        dashboard, which would otherwise ask every replica's data server on every look."""
        now = time.monotonic()
        stale = [v for v in volumes if v.state is not VolumeState.CREATING and (
            v.id not in self._used or now - self._used[v.id][0] > max_age)]
        measured = await asyncio.gather(*(self.usage(v) for v in stale))
        for volume, usage in zip(stale, measured, strict=True):
            known = [u for u in usage.values() if u is not None]
            self._used[volume.id] = (now, max(known) if known else None)
        for gone in set(self._used) - {v.id for v in volumes}:
            del self._used[gone]
        return {v.name: self._used[v.id][1] if v.id in self._used else None for v in volumes}


def _check_growth(volume: Volume, size: int) -> None:
    """Refuse a resize of ``volume`` to ``size`` bytes that is not a growth (or a no-op)."""
    if volume.state in (VolumeState.CREATING, VolumeState.DELETING):
        raise VolumeBusy(name=volume.name, state=volume.state.value)
    if size < volume.size:
        raise ShrinkRefused(name=volume.name, current=format_size(volume.size),
                            size=format_size(size))


def locality_of(text: str) -> Locality:
    try:
        return Locality(text)
    except ValueError:
        raise InvalidLocality(locality=text) from None


def _replica_count(replicas: int | str) -> int:
    try:
        count = int(replicas)
    except (TypeError, ValueError):
        raise InvalidReplicas(replicas=replicas, detail="not a whole number") from None
    if not 1 <= count <= MAX_REPLICAS:
        raise InvalidReplicas(replicas=replicas, detail=f"choose 1 to {MAX_REPLICAS}")
    return count


class ServerSession:
    """A short-lived connection to one data server, for control operations and the node's
    own copies (restores, fills, rebuilds): over the server's unix socket when it runs on
    this node, as an engine's (no TLS to pay for: a 2 GiB restore on one node went from
    197 to 224 MB/s), else TCP."""

    def __init__(self, server: DataServer, access: Access | None, *,
                 copying: bool = False) -> None:
        """``copying``: the session writes a bulk copy (``DataClient``'s ``copying``)."""
        local = None
        if access is not None and access.node and server.node == access.node and server.path:
            local = os.path.join(server.path, LOCAL_SOCKET)
        self.client = DataClient(server.address, server.id, local, call_timeout=CONTROL_TIMEOUT,
                                 access=access, peer=server.node, copying=copying)

    async def __aenter__(self) -> DataClient:
        try:
            await self.client.connect()
        except DataServerUnavailable:
            await self.client.close()
            raise
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
