"""The CSI Controller service: create (also from a snapshot or a volume), delete, publish,
list, expand, modify and report capacity; its snapshot calls are in :mod:`.snapshots`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from google.protobuf import wrappers_pb2

from cargohold.adapters.csi import csi_pb2 as pb
from cargohold.adapters.csi import csi_pb2_grpc as pb_grpc
from cargohold.adapters.csi.rpc import (
    KEY_SECRET,
    PARAMETERS,
    TOPOLOGY_KEY,
    Code,
    Locks,
    access_type,
    capability_problem,
    expanded_size,
    fits,
    flag,
    mutable,
    page_token,
    parameters,
    refused,
    replica_count,
    required,
    required_capability,
    rpc,
    token_after,
    topology,
    unimplemented,
    volume_name,
    volume_size,
)
from cargohold.adapters.csi.snapshots import SnapshotCalls, find_snapshot
from cargohold.core.cipher import read_key
from cargohold.core.models import ServerState, SnapshotState, Volume
from cargohold.core.sizes import MAX_VOLUME_SIZE, MIB, format_size
from cargohold.errors import (
    CargoholdError,
    InvalidArgument,
    InvalidOption,
    NodeNotFound,
    SnapshotNotFound,
    VolumeNotFound,
)
from cargohold.services.agent import Agent
from cargohold.services.clones import CloneService
from cargohold.services.snapshots import SnapshotService
from cargohold.services.volumes import VolumeService
from cargohold.stores.auditlog import AuditLog
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)


class CsiController(SnapshotCalls, pb_grpc.ControllerServicer):
    def __init__(self, catalog: Catalog, volumes: VolumeService, agent: Agent,
                 locks: Locks, snapshots: SnapshotService, clones: CloneService,
                 audit: AuditLog | None = None) -> None:
        self.audit = audit  # every change is written there (``rpc``)
        self.catalog = catalog
        self.volumes = volumes
        self.snapshots = snapshots
        self.clones = clones
        self.agent = agent
        self.lock = locks

    @rpc
    async def CreateVolume(self, request: pb.CreateVolumeRequest) -> Any:
        csi_name = required(request.name, "name")
        if not request.volume_capabilities:
            raise InvalidArgument(what="request", detail="volume_capabilities is missing")
        source = await self._content_source(request)
        params = parameters(request.parameters)
        params.update(mutable(request.mutable_parameters))
        fs_types = {c.mount.fs_type for c in request.volume_capabilities
                    if access_type(c) == "mount" and c.mount.fs_type}
        named = params.get("fs") or (fs_types.pop() if len(fs_types) == 1 else "")
        fs = named or PARAMETERS["fs"]
        for cap in request.volume_capabilities:
            problem = capability_problem(required_capability(cap, True), fs)
            if problem:
                raise InvalidArgument(what="volume_capabilities", detail=problem)
        replicas = replica_count(params.get("replicas", PARAMETERS["replicas"]))
        key_text = request.secrets.get(KEY_SECRET)
        key = read_key(key_text.encode()) if key_text else None
        encrypt = flag("encrypt", params.get("encrypt", PARAMETERS["encrypt"])) or key is not None
        access = sorted({access_type(c) for c in request.volume_capabilities})
        nodes = await self._accessible(request.accessibility_requirements)
        name = volume_name(csi_name)
        async with self.lock(name):
            size = volume_size(request.capacity_range, fs)
            record = await self.catalog.csi_record("volumes", name)
            existing = await self.catalog.find_volume(name)
            if record is None:
                if existing is not None:
                    raise refused(Code.ALREADY_EXISTS, f"cargohold volume {name!r} exists and "
                                   f"was not created through CSI")
                record = await self.catalog.claim_csi_record("volumes", name,
                                                  {"name": csi_name, "access": access})
            if record["name"] != csi_name:
                raise refused(Code.ALREADY_EXISTS, f"volume ID {name!r} belongs to CSI volume "
                               f"{record['name']!r}")
            if existing is not None:
                wanted = (replicas, fs, access, encrypt)
                if not fits(existing.size, request.capacity_range) or wanted != (
                        existing.replica_count, existing.fs, record["access"],
                        existing.encryption is not None):
                    raise refused(Code.ALREADY_EXISTS, f"volume {csi_name!r} exists with "
                                   f"{format_size(existing.size)}, {existing.replica_count} "
                                   f"replicas, {existing.fs}, {'+'.join(record['access'])} "
                                   f"access; asked for {format_size(size)}, {replicas}, {fs}, "
                                   f"{'+'.join(access)}")
                size = existing.size
            try:
                if source is not None:
                    volume = await self._clone(name, source, request, named, replicas)
                else:
                    volume = await self.volumes.create(
                        name, size, replicas, fs, exist_ok=True, encrypt=encrypt, key=key,
                        locality=params.get("locality", PARAMETERS["locality"]))
            except CargoholdError:
                if existing is None and await self.catalog.find_volume(name) is None:
                    await self.catalog.drop_csi_record("volumes", name)  # the name is free again
                raise
        made = self._volume(volume, nodes)
        if request.HasField("volume_content_source"):
            made.content_source.CopyFrom(request.volume_content_source)
        return pb.CreateVolumeResponse(volume=made)

    async def _content_source(self, request: pb.CreateVolumeRequest) -> str | None:
        """What a volume is made from: a snapshot id or a volume name (None: empty)."""
        if not request.HasField("volume_content_source"):
            return None
        source = request.volume_content_source
        kind = source.WhichOneof("type")
        if kind == "snapshot":
            snapshot = await find_snapshot(self.catalog, source.snapshot.snapshot_id)
            if snapshot is None or snapshot.state is not SnapshotState.READY:
                raise SnapshotNotFound(name=source.snapshot.snapshot_id)
            return snapshot.ref
        if kind == "volume":
            if await self.catalog.find_volume(source.volume.volume_id) is None:
                raise VolumeNotFound(name=source.volume.volume_id)
            return source.volume.volume_id
        raise InvalidArgument(what="volume_content_source", detail="names no snapshot or volume")

    async def _clone(self, name: str, source: str, request: pb.CreateVolumeRequest, fs: str,
                     replicas: int) -> Volume:
        """A volume made from ``source``: at least the source's size (a larger one grows);
        OUT_OF_RANGE when the source does not fit the limit."""
        existing = await self.catalog.find_volume(name)
        if existing is not None:
            if existing.source != source and not existing.source.startswith(f"{source}@"):
                raise refused(Code.ALREADY_EXISTS, f"volume {name!r} exists, made from "
                              f"{existing.source or 'nothing'}")
            return existing
        volume_of, _, snapshot_of = source.partition("@")
        origin = await self.catalog.volume(volume_of)
        size = (await self.catalog.snapshot(volume_of, snapshot_of)).size if snapshot_of \
            else origin.size
        if size > (request.capacity_range.limit_bytes or size):
            raise refused(Code.OUT_OF_RANGE, f"the source is {size} bytes, above "
                          f"limit_bytes {request.capacity_range.limit_bytes}")
        if fs and fs != origin.fs:  # a clone holds its source's file system
            raise InvalidArgument(what="volume_capabilities", detail=f"the source holds "
                                  f"{origin.fs}, not {fs}")
        size = max(size, -(-request.capacity_range.required_bytes // MIB) * MIB)
        return await self.clones.clone(name, source, size, replicas, exist_ok=True)

    async def _accessible(self, requirement: pb.TopologyRequirement) -> list[str]:
        """The nodes a new volume is accessible from: every node (attach works anywhere),
        within the requisite topologies when the CO gives some."""
        known = sorted(n.name for n in await self.catalog.nodes())
        requisite = {t.segments.get(TOPOLOGY_KEY) for t in requirement.requisite}
        if not requirement.requisite:
            return known
        nodes = [n for n in known if n in requisite]
        if not nodes:
            raise refused(Code.RESOURCE_EXHAUSTED, "no cargohold node is in the requisite "
                           f"topologies; cargohold nodes: {', '.join(known) or 'none'}")
        return nodes

    def _volume(self, volume: Volume, nodes: Iterable[str]) -> pb.Volume:
        return pb.Volume(volume_id=volume.name, capacity_bytes=volume.size,
                         accessible_topology=[topology(n) for n in nodes])

    @rpc
    async def DeleteVolume(self, request: pb.DeleteVolumeRequest) -> Any:
        name = required(request.volume_id, "volume_id")
        async with self.lock(name):
            if await self.catalog.find_volume(name) is not None:
                with contextlib.suppress(VolumeNotFound):
                    await self.volumes.remove(name)  # attached: FAILED_PRECONDITION
            await self.catalog.drop_csi_record("published", name)
            await self.catalog.drop_csi_record("volumes", name)
        return pb.DeleteVolumeResponse()

    @rpc
    async def ControllerPublishVolume(self, request: pb.ControllerPublishVolumeRequest) -> Any:
        name = required(request.volume_id, "volume_id")
        node = required(request.node_id, "node_id")
        cap = required_capability(request.volume_capability,
                                   request.HasField("volume_capability"))
        async with self.lock(name):
            volume = await self.catalog.volume(name)
            problem = capability_problem(cap, volume.fs)
            if problem:
                raise InvalidArgument(what="volume_capability", detail=problem)
            if node not in {n.name for n in await self.catalog.nodes()}:
                raise NodeNotFound(name=node)
            att = volume.attachment
            if att is not None and att.node != node:
                raise refused(Code.FAILED_PRECONDITION, f"volume {name!r} is attached on node "
                               f"{att.node!r}")
            wanted = {"node": node, "readonly": request.readonly, "access": access_type(cap),
                      "mode": cap.access_mode.mode}
            current = await self.catalog.claim_csi_record("published", name, wanted)
            if current["node"] != node:
                raise refused(Code.FAILED_PRECONDITION, f"volume {name!r} is published to node "
                               f"{current['node']!r}; unpublish it there first")
            if current != wanted:
                raise refused(Code.ALREADY_EXISTS, f"volume {name!r} is published to {node!r} "
                               f"with other arguments: {current}")
        return pb.ControllerPublishVolumeResponse()

    @rpc
    async def ControllerUnpublishVolume(self, request: pb.ControllerUnpublishVolumeRequest
                                        ) -> Any:
        name = required(request.volume_id, "volume_id")
        async with self.lock(name):
            current = await self.catalog.csi_record("published", name)
            if current is not None and request.node_id in ("", current["node"]):
                await self.catalog.drop_csi_record("published", name)
        return pb.ControllerUnpublishVolumeResponse()

    @rpc
    async def ValidateVolumeCapabilities(self, request: pb.ValidateVolumeCapabilitiesRequest
                                         ) -> Any:
        name = required(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise InvalidArgument(what="request", detail="volume_capabilities is missing")
        for cap in request.volume_capabilities:
            required_capability(cap, True)
        volume = await self.catalog.volume(name)
        record = await self.catalog.csi_record("volumes", name)
        problems = [p for p in (capability_problem(c, volume.fs)
                                for c in request.volume_capabilities) if p]
        if record is not None:
            problems += [f"the volume was created for {'+'.join(record['access'])} access"
                         for c in request.volume_capabilities
                         if access_type(c) not in record["access"]][:1]
        try:
            params = parameters(request.parameters)
        except InvalidOption as e:
            problems.append(e.message)
            params = {}
        have = {"replicas": str(volume.replica_count), "fs": volume.fs,
                "encrypt": str(volume.encryption is not None).lower(),
                "locality": volume.locality.value}
        problems += [f"the volume has {key}={have[key]}" for key, value in params.items()
                     if value != have[key]]
        if problems:
            return pb.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        return pb.ValidateVolumeCapabilitiesResponse(
            confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters))

    @rpc
    async def ListVolumes(self, request: pb.ListVolumesRequest) -> Any:
        if request.max_entries < 0:
            raise InvalidArgument(what="max_entries", detail="must not be negative")
        after = token_after(request.starting_token) if request.starting_token else ""
        volumes = sorted((v for v in await self.catalog.volumes() if v.name > after),
                         key=lambda v: v.name)
        next_token = ""
        if request.max_entries and len(volumes) > request.max_entries:
            volumes = volumes[:request.max_entries]
            next_token = page_token(volumes[-1].name)
        published = await self.catalog.csi_records("published")
        nodes = sorted(n.name for n in await self.catalog.nodes())
        status = pb.ListVolumesResponse.VolumeStatus
        entries = [pb.ListVolumesResponse.Entry(
            volume=self._volume(v, nodes),
            status=status(published_node_ids=[published[v.name]["node"]]
                          if v.name in published else []))
            for v in volumes]
        return pb.ListVolumesResponse(entries=entries, next_token=next_token)

    @rpc
    async def GetCapacity(self, request: pb.GetCapacityRequest) -> Any:
        params = parameters(request.parameters)
        replicas = replica_count(params.get("replicas", PARAMETERS["replicas"]))
        fs = params.get("fs", "")
        maximum = wrappers_pb2.Int64Value(value=MAX_VOLUME_SIZE)
        servers = [s for s in await self.catalog.servers() if s.state is ServerState.UP]
        node = request.accessible_topology.segments.get(TOPOLOGY_KEY)
        usable = (replicas > 0 and len(servers) >= replicas
                  and not any(capability_problem(c, fs) for c in request.volume_capabilities)
                  and (node is None or node in {n.name for n in await self.catalog.nodes()}))
        available = sum(s.free for s in servers) // replicas if usable else 0
        return pb.GetCapacityResponse(available_capacity=available, maximum_volume_size=maximum)

    @rpc
    async def ControllerGetCapabilities(self, request: pb.ControllerGetCapabilitiesRequest
                                        ) -> Any:
        rpc = pb.ControllerServiceCapability.RPC
        kinds = (rpc.CREATE_DELETE_VOLUME, rpc.PUBLISH_UNPUBLISH_VOLUME, rpc.LIST_VOLUMES,
                 rpc.GET_CAPACITY, rpc.LIST_VOLUMES_PUBLISHED_NODES, rpc.EXPAND_VOLUME,
                 rpc.CREATE_DELETE_SNAPSHOT, rpc.LIST_SNAPSHOTS, rpc.CLONE_VOLUME,
                 rpc.GET_SNAPSHOT, rpc.MODIFY_VOLUME)
        return pb.ControllerGetCapabilitiesResponse(capabilities=[
            pb.ControllerServiceCapability(rpc=rpc(type=kind)) for kind in kinds])

    @rpc
    async def ControllerExpandVolume(self, request: pb.ControllerExpandVolumeRequest) -> Any:
        """Grow the volume (replicas and record). A mount volume's file system grows in
        NodeExpandVolume; a block volume attached on this node gets its loop device grown
        here, since no NodeExpandVolume follows for it."""
        name = required(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise InvalidArgument(what="request", detail="capacity_range is missing")
        async with self.lock(name):
            volume = await self.catalog.volume(name)
            size = expanded_size(volume, request.capacity_range)
            if request.HasField("volume_capability"):
                access = access_type(required_capability(request.volume_capability, True))
            else:
                access = await self._recorded_access(volume)
            volume = await self.volumes.resize(name, size)
            att = volume.attachment
            if access == "block" and att is not None and att.node == self.agent.node:
                volume = await self.agent.expand(name)
        return pb.ControllerExpandVolumeResponse(capacity_bytes=volume.size,
                                                 node_expansion_required=access == "mount")

    async def _recorded_access(self, volume: Volume) -> str:
        """How ``volume`` is used: as created through CSI, else as it is attached."""
        record = await self.catalog.csi_record("volumes", volume.name)
        if record is not None:
            return "mount" if "mount" in record["access"] else "block"
        att = volume.attachment
        return "block" if att is not None and att.device and not att.mountpoint else "mount"
    ControllerGetVolume = unimplemented("ControllerGetVolume")

    @rpc
    async def ControllerModifyVolume(self, request: pb.ControllerModifyVolumeRequest) -> Any:
        """The mutable parameter ``replicas`` (a VolumeAttributesClass): the replica count
        changes online."""
        name = required(request.volume_id, "volume_id")
        wanted = mutable(request.mutable_parameters)
        async with self.lock(name):
            volume = await self.catalog.volume(name)
            if "replicas" in wanted and replica_count(wanted["replicas"]) != volume.replica_count:
                await self.volumes.set_replicas(name, replica_count(wanted["replicas"]))
        return pb.ControllerModifyVolumeResponse()


