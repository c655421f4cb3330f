"""The CSI snapshot calls: the Controller's (CreateSnapshot, DeleteSnapshot, ListSnapshots,
GetSnapshot) and the GroupController service (volume group snapshots).

A CSI snapshot id is ``VOLUME@SNAPSHOT``, the cargohold name; a CSI snapshot name maps to
a snapshot name as volume names do, and ``csi/snapshots/NAME`` remembers which CSI name and
source volume it was made for (the same name for another volume is ALREADY_EXISTS). A group
snapshot's id is its name; each member is ``VOLUME@GROUP``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from cargohold.adapters.csi import csi_pb2 as pb
from cargohold.adapters.csi import csi_pb2_grpc as pb_grpc
from cargohold.adapters.csi.rpc import (
    KUBERNETES_PARAMETERS,
    Code,
    flag,
    page_token,
    refused,
    required,
    rpc,
    token_after,
    volume_name,
)
from cargohold.core.models import Snapshot, SnapshotState
from cargohold.core.names import split_snapshot
from cargohold.errors import (
    CargoholdError,
    InvalidArgument,
    SnapshotExists,
    SnapshotNotFound,
    VolumeNotFound,
)
from cargohold.services.snapshots import SnapshotService
from cargohold.stores.auditlog import AuditLog
from cargohold.stores.catalog import Catalog


def snapshot_message(snapshot: Snapshot) -> pb.Snapshot:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(snapshot.created * 1e9))
    return pb.Snapshot(size_bytes=snapshot.size, snapshot_id=snapshot.ref,
                       source_volume_id=snapshot.volume, creation_time=created,
                       ready_to_use=snapshot.state is SnapshotState.READY,
                       group_snapshot_id=snapshot.group)


def freeze_parameter(parameters: dict[str, str]) -> bool:
    """The snapshot class's parameters: ``freeze`` ("true", the default, or "false")."""
    own = {k: v for k, v in parameters.items() if not k.startswith(KUBERNETES_PARAMETERS)}
    unknown = sorted(set(own) - {"freeze"})
    if unknown:
        raise InvalidArgument(what="parameters", detail=f"unknown {', '.join(unknown)}; "
                              "a snapshot class takes freeze")
    return flag("freeze", own.get("freeze", "true"))


async def find_snapshot(catalog: Catalog, snapshot_id: str) -> Snapshot | None:
    """The snapshot a CSI snapshot id names, or None (also for an id that cannot be one)."""
    try:
        volume, name = split_snapshot(snapshot_id)
    except InvalidArgument:
        return None
    return await catalog.find_snapshot(volume, name)


class SnapshotCalls:
    """The Controller service's snapshot calls (mixed into ``CsiController``)."""

    catalog: Catalog
    snapshots: SnapshotService
    audit: AuditLog | None

    @rpc
    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest) -> Any:
        csi_name = required(request.name, "name")
        source = required(request.source_volume_id, "source_volume_id")
        freeze = freeze_parameter(dict(request.parameters))
        name = volume_name(csi_name)
        if await self.catalog.find_volume(source) is None:
            raise VolumeNotFound(name=source)
        wanted = {"name": csi_name, "volume": source}
        record = await self.catalog.claim_csi_record("snapshots", name, wanted)
        if record != wanted:
            raise refused(Code.ALREADY_EXISTS, f"snapshot name {csi_name!r} is taken by a "
                          f"snapshot of volume {record.get('volume')!r}")
        try:
            snapshot = await self.snapshots.create(source, name, freeze)
        except CargoholdError:
            if await self.catalog.find_snapshot(source, name) is None:
                await self.catalog.drop_csi_record("snapshots", name)
            raise
        return pb.CreateSnapshotResponse(snapshot=snapshot_message(snapshot))

    @rpc
    async def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest) -> Any:
        snapshot_id = required(request.snapshot_id, "snapshot_id")
        found = await find_snapshot(self.catalog, snapshot_id)
        if found is not None:  # a member of a group goes with its group (FAILED_PRECONDITION)
            await self.snapshots.remove(found.volume, found.name)
            record = await self.catalog.csi_record("snapshots", found.name)
            if record is not None and record.get("volume") == found.volume:
                await self.catalog.drop_csi_record("snapshots", found.name)
        return pb.DeleteSnapshotResponse()

    @rpc
    async def ListSnapshots(self, request: pb.ListSnapshotsRequest) -> Any:
        if request.max_entries < 0:
            raise InvalidArgument(what="max_entries", detail="must not be negative")
        after = token_after(request.starting_token) if request.starting_token else ""
        if request.snapshot_id:
            one = await find_snapshot(self.catalog, request.snapshot_id)
            found = [one] if one is not None else []
        else:
            found = await self.catalog.snapshots(request.source_volume_id)
        # (a snapshot taken for a clone of a volume's contents is cargohold's own: not listed)
        ready = sorted((s for s in found if s.state is SnapshotState.READY and s.ref > after
                        and not s.for_clone and (not request.source_volume_id
                             or s.volume == request.source_volume_id)),
                       key=lambda s: s.ref)
        next_token = ""
        if request.max_entries and len(ready) > request.max_entries:
            ready = ready[:request.max_entries]
            next_token = page_token(ready[-1].ref)
        return pb.ListSnapshotsResponse(
            entries=[pb.ListSnapshotsResponse.Entry(snapshot=snapshot_message(s))
                     for s in ready], next_token=next_token)

    @rpc
    async def GetSnapshot(self, request: pb.GetSnapshotRequest) -> Any:
        snapshot_id = required(request.snapshot_id, "snapshot_id")
        found = await find_snapshot(self.catalog, snapshot_id)
        if found is None:
            raise SnapshotNotFound(name=snapshot_id)
        return pb.GetSnapshotResponse(snapshot=snapshot_message(found))


class CsiGroupController(pb_grpc.GroupControllerServicer):
    """Volume group snapshots: several volumes cut at one instant."""

    def __init__(self, catalog: Catalog, snapshots: SnapshotService,
                 audit: AuditLog | None = None) -> None:
        self.catalog = catalog
        self.snapshots = snapshots
        self.audit = audit

    @rpc
    async def GroupControllerGetCapabilities(
            self, request: pb.GroupControllerGetCapabilitiesRequest) -> Any:
        kind = pb.GroupControllerServiceCapability.RPC
        return pb.GroupControllerGetCapabilitiesResponse(capabilities=[
            pb.GroupControllerServiceCapability(
                rpc=kind(type=kind.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT))])

    @rpc
    async def CreateVolumeGroupSnapshot(self, request: pb.CreateVolumeGroupSnapshotRequest
                                        ) -> Any:
        group = volume_name(required(request.name, "name"))
        if not request.source_volume_ids:
            raise InvalidArgument(what="request", detail="source_volume_ids is missing")
        freeze = freeze_parameter(dict(request.parameters))
        try:
            members = await self.snapshots.create_group(group, list(request.source_volume_ids),
                                                        freeze)
        except SnapshotExists as e:
            raise refused(Code.ALREADY_EXISTS, e.message) from e
        return pb.CreateVolumeGroupSnapshotResponse(group_snapshot=self._group(group, members))

    @rpc
    async def DeleteVolumeGroupSnapshot(self, request: pb.DeleteVolumeGroupSnapshotRequest
                                        ) -> Any:
        group = required(request.group_snapshot_id, "group_snapshot_id")
        members = [s for s in await self.catalog.snapshots() if s.group == group]
        listed = set(request.snapshot_ids)
        if members and listed and listed != {s.ref for s in members}:
            raise refused(Code.FAILED_PRECONDITION, f"group snapshot {group!r} holds "
                          f"{sorted(s.ref for s in members)}, not {sorted(listed)}")
        if members:
            await self.snapshots.remove_group(group)
        return pb.DeleteVolumeGroupSnapshotResponse()

    @rpc
    async def GetVolumeGroupSnapshot(self, request: pb.GetVolumeGroupSnapshotRequest) -> Any:
        group = required(request.group_snapshot_id, "group_snapshot_id")
        members = [s for s in await self.catalog.snapshots() if s.group == group]
        if not members:
            raise SnapshotNotFound(name=f"group {group}")
        return pb.GetVolumeGroupSnapshotResponse(group_snapshot=self._group(group, members))

    @staticmethod
    def _group(group: str, members: list[Snapshot]) -> pb.VolumeGroupSnapshot:
        created = timestamp_pb2.Timestamp()
        created.FromNanoseconds(int(min(s.created for s in members) * 1e9))
        return pb.VolumeGroupSnapshot(
            group_snapshot_id=group, snapshots=[snapshot_message(s) for s in members],
            creation_time=created,
            ready_to_use=all(s.state is SnapshotState.READY for s in members))
