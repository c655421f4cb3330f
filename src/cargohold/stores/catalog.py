"""The cluster's typed records (volumes, data servers, nodes, the CSI driver's notes) on top
of a metadata store.

Every change of a volume record is a compare-and-swap on its revision, retried on conflict,
so several nodes, agents and engines can update one volume without losing changes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from cargohold.core.models import (
    BACKUP_JOB_PREFIX,
    BACKUP_SCHEDULE_PREFIX,
    BACKUP_TARGET_KEY,
    CLUSTER_ID_KEY,
    DRAIN_PREFIX,
    LIVENESS_PREFIX,
    REMOTE_PREFIX,
    SNAPSHOT_PREFIX,
    BackupJob,
    BackupSchedule,
    BackupState,
    BackupTarget,
    DataServer,
    Node,
    Remote,
    Snapshot,
    SnapshotState,
    Volume,
    VolumeState,
    backup_job_key,
    backup_running_key,
    drain_key,
    garbage_key,
    liveness_key,
    node_key,
    remote_key,
    server_key,
    snapshot_key,
    volume_key,
)
from cargohold.core.retry import Backoff, retry
from cargohold.errors import (
    ConcurrentUpdate,
    MetadataUnavailable,
    RemoteExists,
    RemoteNotFound,
    SnapshotExists,
    SnapshotNotFound,
    VolumeExists,
    VolumeNotFound,
)
from cargohold.stores.metadata import Compare, Delete, MetadataStore, Put

#: A compare-and-swap that lost to another writer reads the record again and retries at once.
CAS = Backoff(first=0.0, most=0.0, attempts=50)


class Catalog:
    def __init__(self, store: MetadataStore) -> None:
        self.store = store

    # -- volumes -------------------------------------------------------------------------

    async def volume(self, name: str) -> Volume:
        kv = await self.store.get(volume_key(name))
        if kv is None:
            raise VolumeNotFound(name=name)
        return Volume.model_validate_json(kv.value)

    async def find_volume(self, name: str) -> Volume | None:
        kv = await self.store.get(volume_key(name))
        return None if kv is None else Volume.model_validate_json(kv.value)

    async def volumes(self) -> list[Volume]:
        return [Volume.model_validate_json(kv.value) for kv in await self.store.range("volumes/")]

    async def add_volume(self, volume: Volume) -> None:
        key = volume_key(volume.name)
        result = await self.store.txn([Compare.absent(key)], [Put(key, volume.dump())])
        if not result.succeeded:
            raise VolumeExists(name=volume.name)

    async def update_volume(self, name: str, change: Callable[[Volume], Volume | None]) -> Volume:
        """Apply ``change`` to the current record and store it atomically.

        ``change`` may raise to refuse the update, or return None to leave the record as it
        is. It is called again with fresh data when another writer got there first.
        """
        key = volume_key(name)

        async def attempt() -> Volume:
            kv = await self.store.get(key)
            if kv is None:
                raise VolumeNotFound(name=name)
            current = Volume.model_validate_json(kv.value)
            updated = change(current.model_copy(deep=True))
            if updated is None:
                return current
            value = updated.dump()
            try:
                result = await self.store.txn(
                    [Compare.revision(key, kv.mod_revision)], [Put(key, value)]
                )
            except MetadataUnavailable:
                # The answer was lost (an etcd election, say): read whether the write landed.
                # It holds only on this revision, so the record says which it was.
                now = await self.store.get(key)
                if now is not None and now.value == value and now.mod_revision > kv.mod_revision:
                    return updated
                raise
            if not result.succeeded:
                raise ConcurrentUpdate(what=f"volume {name!r}")
            return updated

        return await retry(attempt, CAS, what=f"updating volume {name!r}", quiet=True,
                           temporary=lambda e: isinstance(e, ConcurrentUpdate))

    async def remove_volume(self, name: str) -> None:
        await self.store.delete(volume_key(name))

    async def remove_volume_if(self, name: str, volume_id: str, state: VolumeState) -> bool:
        """Remove the record of ``name`` only while it is still volume ``volume_id`` in
        ``state`` (one compare-and-swap); return whether it was removed."""
        key = volume_key(name)
        kv = await self.store.get(key)
        if kv is None:
            return False
        current = Volume.model_validate_json(kv.value)
        if current.id != volume_id or current.state is not state:
            return False
        return (await self.store.txn([Compare.revision(key, kv.mod_revision)],
                                     [Delete(key)])).succeeded

    # -- snapshots ---------------------------------------------------------------------

    async def snapshot(self, volume: str, name: str) -> Snapshot:
        found = await self.find_snapshot(volume, name)
        if found is None:
            raise SnapshotNotFound(name=f"{volume}@{name}")
        return found

    async def find_snapshot(self, volume: str, name: str) -> Snapshot | None:
        kv = await self.store.get(snapshot_key(volume, name))
        return None if kv is None else Snapshot.model_validate_json(kv.value)

    async def snapshots(self, volume: str = "") -> list[Snapshot]:
        """The snapshots of ``volume`` (all volumes': ""), oldest first."""
        prefix = snapshot_key(volume) if volume else SNAPSHOT_PREFIX
        found = [Snapshot.model_validate_json(kv.value) for kv in await self.store.range(prefix)]
        return sorted(found, key=lambda s: (s.created, s.volume, s.name))

    async def add_snapshot(self, snapshot: Snapshot) -> None:
        key = snapshot_key(snapshot.volume, snapshot.name)
        result = await self.store.txn([Compare.absent(key)], [Put(key, snapshot.dump())])
        if not result.succeeded:
            raise SnapshotExists(name=snapshot.ref)

    async def update_snapshot(self, volume: str, name: str,
                              change: Callable[[Snapshot], Snapshot | None]) -> Snapshot | None:
        """Apply ``change`` to the snapshot's record atomically (None: leave it); None when
        the record is gone."""
        key = snapshot_key(volume, name)

        async def attempt() -> Snapshot | None:
            kv = await self.store.get(key)
            if kv is None:
                return None
            updated = change(Snapshot.model_validate_json(kv.value))
            if updated is None:
                return Snapshot.model_validate_json(kv.value)
            result = await self.store.txn([Compare.revision(key, kv.mod_revision)],
                                          [Put(key, updated.dump())])
            if not result.succeeded:
                raise ConcurrentUpdate(what=f"snapshot {volume}@{name}")
            return updated

        return await retry(attempt, CAS, what=f"updating snapshot {volume}@{name}", quiet=True,
                           temporary=lambda e: isinstance(e, ConcurrentUpdate))

    async def hold_snapshots(self, volume: str, add: Sequence[str] = (),
                             drop: Sequence[str] = ()) -> None:
        """Record that the data servers ``add`` keep every ready snapshot of ``volume``
        (they were given them with the volume's data) and that ``drop`` keep none."""
        for snapshot in await self.snapshots(volume):
            if snapshot.state is not SnapshotState.READY:
                continue

            def change(s: Snapshot) -> Snapshot | None:
                now = [sid for sid in s.servers if sid not in drop]
                now += [sid for sid in add if sid not in now]
                if now == s.servers:
                    return None
                s.servers = now
                return s

            await self.update_snapshot(volume, snapshot.name, change)

    async def remove_snapshot_if(self, snapshot: Snapshot,
                                 check: Callable[[Snapshot], bool]) -> bool:
        """Remove a snapshot's record only while ``check`` holds for it (one CAS)."""
        key = snapshot_key(snapshot.volume, snapshot.name)
        kv = await self.store.get(key)
        if kv is None or not check(Snapshot.model_validate_json(kv.value)):
            return False
        return (await self.store.txn([Compare.revision(key, kv.mod_revision)],
                                     [Delete(key)])).succeeded

    # -- data servers and nodes ----------------------------------------------------------

    async def put_server(self, server: DataServer, lease: int = 0) -> None:
        await self.store.put(server_key(server.id), server.dump(), lease=lease)

    async def servers(self) -> list[DataServer]:
        return [DataServer.model_validate_json(kv.value)
                for kv in await self.store.range("dataservers/")]

    async def servers_for_placement(self) -> list[DataServer]:
        """The data servers, each with ``provisioned`` counted from the volume records too:
        a server reports its own total only once a second, so a replica created a moment
        ago would not count yet."""
        recorded: dict[str, int] = {}
        for volume in await self.volumes():
            for replica in volume.replicas:
                recorded[replica.server] = recorded.get(replica.server, 0) + volume.size
        servers = await self.servers()
        for server in servers:
            server.provisioned = max(server.provisioned, recorded.get(server.id, 0))
        return servers

    async def server(self, server_id: str) -> DataServer | None:
        kv = await self.store.get(server_key(server_id))
        return None if kv is None else DataServer.model_validate_json(kv.value)

    async def put_node(self, node: Node, lease: int = 0) -> None:
        await self.store.put(node_key(node.name), node.dump(), lease=lease)

    async def nodes(self) -> list[Node]:
        return [Node.model_validate_json(kv.value) for kv in await self.store.range("nodes/")]

    async def live_nodes(self) -> set[str]:
        """Nodes whose lease is alive: a node without one is down (or never started)."""
        return {kv.key.rsplit("/", 1)[1] for kv in await self.store.range(LIVENESS_PREFIX)}

    async def node_alive(self, name: str) -> bool:
        return await self.store.get(liveness_key(name)) is not None

    async def remove_node(self, name: str) -> list[str]:
        """Forget node ``name`` and its data servers (one transaction); return their ids.
        Replicas still recorded on them are then rebuilt elsewhere (``services.rebuild``)."""
        ids = [s.id for s in await self.servers() if s.node == name]
        await self.store.txn([], [Delete(node_key(name)), Delete(drain_key(name)),
                                  *(Delete(server_key(i)) for i in ids)])
        return ids

    # -- draining: nodes whose replicas move away ------------------------------------------

    async def set_draining(self, node: str, draining: bool) -> None:
        if draining:
            await self.store.put(drain_key(node), b"")
        else:
            await self.store.delete(drain_key(node))

    async def draining(self) -> set[str]:
        return {kv.key[len(DRAIN_PREFIX):] for kv in await self.store.range(DRAIN_PREFIX)}

    async def draining_servers(self) -> set[str]:
        """Ids of the data servers of draining nodes: no new replica goes there."""
        draining = await self.draining()
        return {s.id for s in await self.servers() if s.node in draining}

    # -- garbage: replicas whose data server was unreachable when their volume went -------

    async def add_garbage(self, server_id: str, volume_id: str) -> None:
        await self.store.put(garbage_key(server_id, volume_id), b"")

    async def garbage(self) -> list[tuple[str, str]]:
        pairs = []
        for kv in await self.store.range("garbage/"):
            _, server_id, volume_id = kv.key.split("/", 2)
            pairs.append((server_id, volume_id))
        return pairs

    async def drop_garbage(self, server_id: str, volume_id: str) -> None:
        await self.store.txn([], [Delete(garbage_key(server_id, volume_id))])

    # -- the CSI driver's notes beside the volume records --------------------------------
    # ``csi/volumes/NAME``: {"name": CSI name, "access": access types} of a volume created
    # through CSI; ``csi/published/NAME``: {"node", "readonly", "access", "mode"} of the node
    # the volume is published to.

    # -- the cluster's trust --------------------------------------------------------------
    async def claim_trust(self, value: dict[str, str]) -> dict[str, str]:
        """Record which CA and cluster key the cluster uses (the first node to start sets it;
        fingerprints only, no secret); return what the record holds afterwards."""
        key = "cluster/trust"
        if (await self.store.txn([Compare.absent(key)], [Put(key, json.dumps(value).encode())])
                ).succeeded:
            return value
        kv = await self.store.get(key)
        return value if kv is None else dict(json.loads(kv.value))

    # -- CSI -------------------------------------------------------------------------------
    async def csi_record(self, kind: str, name: str) -> dict[str, Any] | None:
        kv = await self.store.get(f"csi/{kind}/{name}")
        return None if kv is None else dict(json.loads(kv.value))

    async def claim_csi_record(self, kind: str, name: str,
                               value: dict[str, Any]) -> dict[str, Any]:
        """Store ``value`` unless the key exists; return what the key holds afterwards."""
        key = f"csi/{kind}/{name}"
        if (await self.store.txn([Compare.absent(key)], [Put(key, json.dumps(value).encode())])
                ).succeeded:
            return value
        return await self.csi_record(kind, name) or value

    async def drop_csi_record(self, kind: str, name: str) -> None:
        await self.store.txn([], [Delete(f"csi/{kind}/{name}")])

    async def csi_records(self, kind: str) -> dict[str, dict[str, Any]]:
        prefix = f"csi/{kind}/"
        return {kv.key[len(prefix):]: json.loads(kv.value)
                for kv in await self.store.range(prefix)}

    # -- backups ---------------------------------------------------------------------------
    async def backup_target(self) -> BackupTarget | None:
        kv = await self.store.get(BACKUP_TARGET_KEY)
        return None if kv is None else BackupTarget.model_validate_json(kv.value)

    async def set_backup_target(self, target: BackupTarget) -> None:
        await self.store.put(BACKUP_TARGET_KEY, target.dump())

    async def start_backup_job(self, job: BackupJob) -> str:
        """Record ``job`` as running; a backup only while no other of its volume runs.
        Returns "" when recorded, else the id of the backup of that volume that runs."""
        puts = [Put(backup_job_key(job.id), job.dump())]
        guards = []
        if job.kind == "backup":
            running = backup_running_key(job.volume)
            guards.append(Compare.absent(running))
            puts.append(Put(running, job.id.encode()))
        if (await self.store.txn(guards, puts)).succeeded:
            return ""
        kv = await self.store.get(backup_running_key(job.volume))
        return kv.value.decode() if kv is not None else "?"

    async def backup_job(self, job_id: str) -> BackupJob | None:
        kv = await self.store.get(backup_job_key(job_id))
        return None if kv is None else BackupJob.model_validate_json(kv.value)

    async def backup_jobs(self) -> list[BackupJob]:
        return [BackupJob.model_validate_json(kv.value)
                for kv in await self.store.range(BACKUP_JOB_PREFIX)]

    async def put_backup_job(self, job: BackupJob) -> None:
        """Store the job's progress; once it has ended, its volume may be backed up again."""
        ops: list[Put | Delete] = [Put(backup_job_key(job.id), job.dump())]
        if job.state is not BackupState.RUNNING and job.kind == "backup":
            running = backup_running_key(job.volume)
            kv = await self.store.get(running)
            if kv is not None and kv.value.decode() == job.id:
                ops.append(Delete(running))
        await self.store.txn([], ops)

    async def drop_backup_job(self, job_id: str, volume: str) -> None:
        """Forget a job that never started (and its volume's running mark, if its)."""
        ops = [Delete(backup_job_key(job_id))]
        kv = await self.store.get(backup_running_key(volume))
        if kv is not None and kv.value.decode() == job_id:
            ops.append(Delete(backup_running_key(volume)))
        await self.store.txn([], ops)

    async def backup_schedules(self) -> list[BackupSchedule]:
        return [BackupSchedule.model_validate_json(kv.value)
                for kv in await self.store.range(BACKUP_SCHEDULE_PREFIX)]

    async def put_backup_schedule(self, schedule: BackupSchedule) -> None:
        await self.store.put(BACKUP_SCHEDULE_PREFIX + schedule.volume, schedule.dump())

    async def drop_backup_schedule(self, volume: str) -> bool:
        key = BACKUP_SCHEDULE_PREFIX + volume
        if await self.store.get(key) is None:
            return False
        await self.store.delete(key)
        return True

    async def update_backup_schedule(
            self, volume: str, change: Callable[[BackupSchedule], BackupSchedule | None]
    ) -> BackupSchedule | None:
        """Apply ``change`` atomically (compare-and-swap, once: None when the record moved
        meanwhile, is gone, or ``change`` left it)."""
        key = BACKUP_SCHEDULE_PREFIX + volume
        kv = await self.store.get(key)
        if kv is None:
            return None
        updated = change(BackupSchedule.model_validate_json(kv.value))
        if updated is None:
            return None
        result = await self.store.txn([Compare.revision(key, kv.mod_revision)],
                                      [Put(key, updated.dump())])
        return updated if result.succeeded else None

    # -- other clusters ----------------------------------------------------------------------
    async def cluster_id(self) -> str:
        """This cluster's id (made by the first node that asks): how other clusters tell
        the volumes this one replicates to them from another's."""
        kv = await self.store.get(CLUSTER_ID_KEY)
        if kv is not None:
            return kv.value.decode()
        made = uuid.uuid4().hex
        await self.store.txn([Compare.absent(CLUSTER_ID_KEY)],
                             [Put(CLUSTER_ID_KEY, made.encode())])
        kv = await self.store.get(CLUSTER_ID_KEY)
        return made if kv is None else kv.value.decode()

    async def remotes(self) -> list[Remote]:
        return [Remote.model_validate_json(kv.value)
                for kv in await self.store.range(REMOTE_PREFIX)]

    async def remote(self, name: str) -> Remote:
        kv = await self.store.get(remote_key(name))
        if kv is None:
            raise RemoteNotFound(name=name)
        return Remote.model_validate_json(kv.value)

    async def add_remote(self, remote: Remote) -> None:
        key = remote_key(remote.name)
        if not (await self.store.txn([Compare.absent(key)], [Put(key, remote.dump())])
                ).succeeded:
            raise RemoteExists(name=remote.name)

    async def drop_remote(self, name: str) -> None:
        await self.remote(name)
        await self.store.delete(remote_key(name))
