"""The Kubernetes CSI driver (spec v1.12), served by the node over gRPC on a unix socket.

Every node serves the Identity, Controller and Node services on one socket (the node
decides where: ``--csi-endpoint``). The messages come from ``csi.proto`` beside this module;
its Python modules are generated when cargohold is built.

- Volume IDs are cargohold volume names. A CSI name that is a valid cargohold name is used
  as it is; any other (too long, other characters) becomes a readable prefix plus a hash
  of the whole name. The CSI name and the access types a volume was created for are kept
  in the metadata store under ``csi/volumes/NAME``, so a repeated CreateVolume finds its
  volume and a different CSI name that maps to the same volume name is refused.
- ControllerPublishVolume records the one node that may stage a volume
  (``csi/published/NAME``); NodeStageVolume on another node is refused.
- NodeStageVolume attaches the volume here: with mount access the agent mounts the file
  system and the staging path becomes a bind mount of it; with block access the agent
  stops at the loop device (never formatted) and nothing is mounted. NodePublishVolume
  bind-mounts the staging path (mount) or the loop device (block, onto a file) at the
  target path. What is staged and published on this host is kept in
  ``STATE_DIR/csi-node.json``.
- Expansion is online: ControllerExpandVolume grows the replicas and the record (whole MiB,
  never shrinking) and, for a block volume attached on this node, its loop device;
  NodeExpandVolume grows the engine's file, the loop device and the file system of a
  volume staged here (``Agent.expand``).
- Every call is idempotent. Errors map to gRPC status codes in one place:
  :func:`grpc_status`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

from cargohold import __version__
from cargohold.adapters import csi_pb2 as pb
from cargohold.adapters import csi_pb2_grpc as pb_grpc
from cargohold.clients import kernel
from cargohold.core.models import ServerState, Volume
from cargohold.core.names import check_name
from cargohold.core.sizes import GIB, MAX_VOLUME_SIZE, MIB, MIN_VOLUME_SIZE, format_size
from cargohold.errors import (
    CargoholdError,
    InvalidArgument,
    InvalidName,
    InvalidOption,
    InvalidReplicas,
    Kind,
    NodeNotFound,
    VolumeNotFound,
)
from cargohold.services.agent import Agent, EngineDir
from cargohold.services.volumes import VolumeService
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import Compare, Delete, MetadataStore, Put

log = logging.getLogger(__name__)

DRIVER_NAME = "cargohold.io"
TOPOLOGY_KEY = "cargohold.io/node"
MAX_VOLUMES_PER_NODE = 64  # attached volumes: one engine process and one loop device each
DEFAULT_SIZE = GIB
PARAMETERS = {"replicas": "2", "fs": "ext4"}
KUBERNETES_PARAMETERS = "csi.storage.k8s.io/"  # added by the external-provisioner; ignored
Mode = pb.VolumeCapability.AccessMode
MODES = (Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY)  # one host at a time
BIND_FLAGS = frozenset({"ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
                        "noatime", "atime", "nodiratime", "diratime", "relatime",
                        "norelatime", "strictatime"})  # per-mount flags a bind mount takes
TOKEN_PREFIX = "cargohold-after:"
Code = grpc.StatusCode

# --- errors: the one place where they become gRPC status codes ---------------------------


class CsiError(Exception):
    """A CSI protocol outcome that no cargohold error describes; the spec names its code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


GRPC_CODES = {
    Kind.INVALID: Code.INVALID_ARGUMENT,
    Kind.NOT_FOUND: Code.NOT_FOUND,
    Kind.CONFLICT: Code.FAILED_PRECONDITION,  # e.g. attached on another node
    Kind.FENCED: Code.FAILED_PRECONDITION,
    Kind.NO_SPACE: Code.RESOURCE_EXHAUSTED,
    Kind.UNAVAILABLE: Code.UNAVAILABLE,
    Kind.INTERNAL: Code.INTERNAL,
}
GRPC_CODES_BY_ERROR = {  # where the spec is more precise than the kind
    "volume_exists": Code.ALREADY_EXISTS,
    "volume_busy": Code.ABORTED,  # an operation is pending on the volume
    "concurrent_update": Code.ABORTED,
    "not_enough_data_servers": Code.RESOURCE_EXHAUSTED,
}


def grpc_status(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, CsiError):
        return error.code, error.message
    if isinstance(error, CargoholdError):
        code = GRPC_CODES_BY_ERROR.get(error.code, GRPC_CODES[error.kind])
        return code, f"{error.message} [{error.code}]"
    return Code.INTERNAL, str(error)  # a host command failed (mount, losetup), or an OSError


Handler = Callable[[Any, Any], Awaitable[Any]]


def _rpc(method: Handler) -> Callable[[Any, Any, Any], Awaitable[Any]]:
    @functools.wraps(method)
    async def serve(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request)
        except (CsiError, CargoholdError, kernel.HostCommandFailed, OSError) as e:
            code, message = grpc_status(e)
        level = logging.ERROR if code in (Code.INTERNAL, Code.UNKNOWN) else logging.INFO
        log.log(level, "CSI %s: %s: %s", method.__name__, code.name, message)
        await context.abort(code, message)

    return serve


def _unimplemented(what: str) -> Callable[[Any, Any, Any], Awaitable[Any]]:
    async def serve(self: Any, request: Any, context: Any) -> Any:
        await context.abort(Code.UNIMPLEMENTED, f"cargohold has no {what} yet")

    return serve


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(what="request", detail=f"{field} is missing")
    return value


def _required_capability(cap: pb.VolumeCapability, present: bool) -> pb.VolumeCapability:
    if not present or cap.WhichOneof("access_type") is None:
        raise InvalidArgument(what="volume_capability", detail="it needs block or mount access")
    if cap.access_mode.mode == Mode.UNKNOWN:
        raise InvalidArgument(what="volume_capability", detail="access_mode is missing")
    return cap


def _access(cap: pb.VolumeCapability) -> str:
    return "block" if cap.WhichOneof("access_type") == "block" else "mount"


def capability_problem(cap: pb.VolumeCapability, fs: str = "") -> str:
    """Why cargohold cannot serve ``cap`` (for a volume holding ``fs``); "" if it can."""
    if cap.access_mode.mode not in MODES:
        return (f"access mode {Mode.Mode.Name(cap.access_mode.mode)} is not supported: a volume is "
                f"attached on one node at a time (SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY)")
    if _access(cap) == "block":
        return ""
    mount = cap.mount
    if mount.fs_type and mount.fs_type not in kernel.FILESYSTEMS:
        return f"fs_type {mount.fs_type!r} is not supported: use {' or '.join(kernel.FILESYSTEMS)}"
    if fs and mount.fs_type and mount.fs_type != fs:
        return f"the volume holds {fs}, not {mount.fs_type}"
    unknown = sorted(set(mount.mount_flags) - BIND_FLAGS)
    if unknown:
        return (f"mount flags {', '.join(unknown)} are not supported; a bind mount takes "
                f"{', '.join(sorted(BIND_FLAGS))}")
    if mount.volume_mount_group:
        return "volume_mount_group is not supported"
    return ""


def volume_name(csi_name: str) -> str:
    """The cargohold volume name for a CSI volume name (deterministic)."""
    try:
        return check_name(csi_name)
    except InvalidName:
        pass
    digest = hashlib.sha256(csi_name.encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", csi_name).lstrip("-._")[:40].rstrip("-._")
    return f"{readable or 'csi'}-{digest}"


def volume_size(capacity: pb.CapacityRange, fs: str) -> int:
    """A size in whole MiB within ``capacity`` (OUT_OF_RANGE if there is none)."""
    required, limit = capacity.required_bytes, capacity.limit_bytes
    if required < 0 or limit < 0:
        raise InvalidArgument(what="capacity_range", detail="sizes must not be negative")
    floor = kernel.MIN_XFS_SIZE if fs == "xfs" else MIN_VOLUME_SIZE
    ceiling = min(limit // MIB * MIB, MAX_VOLUME_SIZE) if limit else MAX_VOLUME_SIZE
    if required:
        size = max(-(-required // MIB) * MIB, floor)
    else:
        size = max(min(DEFAULT_SIZE, ceiling), floor)
    if size > ceiling:
        raise CsiError(Code.OUT_OF_RANGE, f"no {fs} volume fits capacity_range [{required}, "
                       f"{limit or 'no limit'}]: cargohold volumes are whole MiB from "
                       f"{format_size(floor)} to {format_size(MAX_VOLUME_SIZE)}")
    return size


def expanded_size(volume: Volume, capacity: pb.CapacityRange) -> int:
    """The size ``volume`` grows to for ``capacity`` (its own size if it already fits).

    A volume never shrinks: a limit below its size, or a range cargohold cannot give (above
    the largest volume, or no whole MiB inside it), is OUT_OF_RANGE.
    """
    required, limit = capacity.required_bytes, capacity.limit_bytes
    if required < 0 or limit < 0:
        raise InvalidArgument(what="capacity_range", detail="sizes must not be negative")
    if limit and limit < volume.size:
        raise CsiError(Code.OUT_OF_RANGE, f"volume {volume.name!r} is "
                       f"{format_size(volume.size)} ({volume.size} bytes), above limit_bytes "
                       f"{limit}: volumes only grow")
    size = max(-(-required // MIB) * MIB, volume.size)
    ceiling = min(limit // MIB * MIB, MAX_VOLUME_SIZE) if limit else MAX_VOLUME_SIZE
    if size > ceiling:
        raise CsiError(Code.OUT_OF_RANGE, f"volume {volume.name!r} cannot grow to capacity_range "
                       f"[{required}, {limit or 'no limit'}]: cargohold volumes are whole MiB "
                       f"up to {format_size(MAX_VOLUME_SIZE)}")
    return size


def _fits(size: int, capacity: pb.CapacityRange) -> bool:
    return capacity.required_bytes <= size and (not capacity.limit_bytes
                                                or size <= capacity.limit_bytes)


def _parameters(given: Mapping[str, str]) -> dict[str, str]:
    chosen = {}
    for key, value in given.items():
        if key.startswith(KUBERNETES_PARAMETERS):
            continue
        if key not in PARAMETERS:
            raise InvalidOption(option=key, known=", ".join(sorted(PARAMETERS)))
        chosen[key] = value
    return chosen


def _replicas(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidReplicas(replicas=value, detail="not a whole number") from None


def _token(name: str) -> str:
    return base64.urlsafe_b64encode(f"{TOKEN_PREFIX}{name}".encode()).decode()


def _after(token: str) -> str:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, ValueError):
        text = ""
    if not text.startswith(TOKEN_PREFIX):
        raise CsiError(Code.ABORTED, f"starting_token {token!r} is not one ListVolumes gave; "
                       f"start again without it")
    return text[len(TOKEN_PREFIX):]


class Locks:
    """One asyncio lock per volume: calls on one volume run one at a time."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


class CsiRecords:
    """What the driver keeps in the metadata store beside cargohold's own records.

    ``csi/volumes/NAME``: {"name": CSI name, "access": access types} of a volume created
    through CSI; ``csi/published/NAME``: {"node", "readonly", "access", "mode"} of the node
    the volume is published to.
    """

    def __init__(self, store: MetadataStore) -> None:
        self.store = store

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        kv = await self.store.get(f"csi/{kind}/{name}")
        return None if kv is None else dict(json.loads(kv.value))

    async def claim(self, kind: str, name: str, value: dict[str, Any]) -> dict[str, Any]:
        """Store ``value`` unless the key exists; return what the key holds afterwards."""
        key = f"csi/{kind}/{name}"
        if (await self.store.txn([Compare.absent(key)], [Put(key, json.dumps(value).encode())])
                ).succeeded:
            return value
        return await self.get(kind, name) or value

    async def drop(self, kind: str, name: str) -> None:
        await self.store.txn([], [Delete(f"csi/{kind}/{name}")])

    async def all(self, kind: str) -> dict[str, dict[str, Any]]:
        prefix = f"csi/{kind}/"
        return {kv.key[len(prefix):]: json.loads(kv.value)
                for kv in await self.store.range(prefix)}


def _topology(node: str) -> pb.Topology:
    return pb.Topology(segments={TOPOLOGY_KEY: node})


# --- Identity ----------------------------------------------------------------------------


class Identity(pb_grpc.IdentityServicer):
    def __init__(self, catalog: Catalog, ready: Callable[[], bool]) -> None:
        self.catalog = catalog
        self.ready = ready

    @_rpc
    async def GetPluginInfo(self, request: pb.GetPluginInfoRequest) -> Any:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    @_rpc
    async def GetPluginCapabilities(self, request: pb.GetPluginCapabilitiesRequest) -> Any:
        service = pb.PluginCapability.Service
        expansion = pb.PluginCapability.VolumeExpansion
        return pb.GetPluginCapabilitiesResponse(capabilities=[
            *(pb.PluginCapability(service=service(type=kind))
              for kind in (service.CONTROLLER_SERVICE, service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            pb.PluginCapability(volume_expansion=expansion(type=expansion.ONLINE))])

    @_rpc
    async def Probe(self, request: pb.ProbeRequest) -> Any:
        try:
            await self.catalog.nodes()  # the metadata store answers
        except CargoholdError as e:
            raise CsiError(Code.FAILED_PRECONDITION, f"not healthy: {e.message}") from e
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self.ready()))


# --- Controller --------------------------------------------------------------------------


class Controller(pb_grpc.ControllerServicer):
    def __init__(self, catalog: Catalog, volumes: VolumeService, agent: Agent,
                 locks: Locks) -> None:
        self.catalog = catalog
        self.volumes = volumes
        self.agent = agent
        self.records = CsiRecords(catalog.store)
        self.lock = locks

    @_rpc
    async def CreateVolume(self, request: pb.CreateVolumeRequest) -> Any:
        csi_name = _required(request.name, "name")
        if not request.volume_capabilities:
            raise InvalidArgument(what="request", detail="volume_capabilities is missing")
        if request.HasField("volume_content_source"):
            raise InvalidArgument(what="volume_content_source", detail="cargohold cannot yet "
                                  "create a volume from a snapshot or another volume")
        if request.mutable_parameters:
            raise InvalidArgument(what="mutable_parameters", detail="not supported")
        params = _parameters(request.parameters)
        fs_types = {c.mount.fs_type for c in request.volume_capabilities
                    if _access(c) == "mount" and c.mount.fs_type}
        fs = params.get("fs") or (fs_types.pop() if len(fs_types) == 1 else PARAMETERS["fs"])
        for cap in request.volume_capabilities:
            problem = capability_problem(_required_capability(cap, True), fs)
            if problem:
                raise InvalidArgument(what="volume_capabilities", detail=problem)
        replicas = _replicas(params.get("replicas", PARAMETERS["replicas"]))
        access = sorted({_access(c) for c in request.volume_capabilities})
        nodes = await self._accessible(request.accessibility_requirements)
        name = volume_name(csi_name)
        async with self.lock(name):
            size = volume_size(request.capacity_range, fs)
            record = await self.records.get("volumes", name)
            existing = await self.catalog.find_volume(name)
            if record is None:
                if existing is not None:
                    raise CsiError(Code.ALREADY_EXISTS, f"cargohold volume {name!r} exists and "
                                   f"was not created through CSI")
                record = await self.records.claim("volumes", name,
                                                  {"name": csi_name, "access": access})
            if record["name"] != csi_name:
                raise CsiError(Code.ALREADY_EXISTS, f"volume ID {name!r} belongs to CSI volume "
                               f"{record['name']!r}")
            if existing is not None:
                wanted = (replicas, fs, access)
                if not _fits(existing.size, request.capacity_range) or wanted != (
                        existing.replica_count, existing.fs, record["access"]):
                    raise CsiError(Code.ALREADY_EXISTS, f"volume {csi_name!r} exists with "
                                   f"{format_size(existing.size)}, {existing.replica_count} "
                                   f"replicas, {existing.fs}, {'+'.join(record['access'])} "
                                   f"access; asked for {format_size(size)}, {replicas}, {fs}, "
                                   f"{'+'.join(access)}")
                size = existing.size
            try:
                volume = await self.volumes.create(name, size, replicas, fs, exist_ok=True)
            except CargoholdError:
                if existing is None and await self.catalog.find_volume(name) is None:
                    await self.records.drop("volumes", name)  # the name is free again
                raise
        return pb.CreateVolumeResponse(volume=self._volume(volume, nodes))

    async def _accessible(self, requirement: pb.TopologyRequirement) -> list[str]:
        """The nodes a new volume is accessible from: every node (attach works anywhere),
        within the requisite topologies when the CO gives some."""
        known = sorted(n.name for n in await self.catalog.nodes())
        requisite = {t.segments.get(TOPOLOGY_KEY) for t in requirement.requisite}
        if not requirement.requisite:
            return known
        nodes = [n for n in known if n in requisite]
        if not nodes:
            raise CsiError(Code.RESOURCE_EXHAUSTED, "no cargohold node is in the requisite "
                           f"topologies; cargohold nodes: {', '.join(known) or 'none'}")
        return nodes

    def _volume(self, volume: Volume, nodes: Iterable[str]) -> pb.Volume:
        return pb.Volume(volume_id=volume.name, capacity_bytes=volume.size,
                         accessible_topology=[_topology(n) for n in nodes])

    @_rpc
    async def DeleteVolume(self, request: pb.DeleteVolumeRequest) -> Any:
        name = _required(request.volume_id, "volume_id")
        async with self.lock(name):
            if await self.catalog.find_volume(name) is not None:
                with contextlib.suppress(VolumeNotFound):
                    await self.volumes.remove(name)  # attached: FAILED_PRECONDITION
            await self.records.drop("published", name)
            await self.records.drop("volumes", name)
        return pb.DeleteVolumeResponse()

    @_rpc
    async def ControllerPublishVolume(self, request: pb.ControllerPublishVolumeRequest) -> Any:
        name = _required(request.volume_id, "volume_id")
        node = _required(request.node_id, "node_id")
        cap = _required_capability(request.volume_capability,
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
                raise CsiError(Code.FAILED_PRECONDITION, f"volume {name!r} is attached on node "
                               f"{att.node!r}")
            wanted = {"node": node, "readonly": request.readonly, "access": _access(cap),
                      "mode": cap.access_mode.mode}
            current = await self.records.claim("published", name, wanted)
            if current["node"] != node:
                raise CsiError(Code.FAILED_PRECONDITION, f"volume {name!r} is published to node "
                               f"{current['node']!r}; unpublish it there first")
            if current != wanted:
                raise CsiError(Code.ALREADY_EXISTS, f"volume {name!r} is published to {node!r} "
                               f"with other arguments: {current}")
        return pb.ControllerPublishVolumeResponse()

    @_rpc
    async def ControllerUnpublishVolume(self, request: pb.ControllerUnpublishVolumeRequest
                                        ) -> Any:
        name = _required(request.volume_id, "volume_id")
        async with self.lock(name):
            current = await self.records.get("published", name)
            if current is not None and request.node_id in ("", current["node"]):
                await self.records.drop("published", name)
        return pb.ControllerUnpublishVolumeResponse()

    @_rpc
    async def ValidateVolumeCapabilities(self, request: pb.ValidateVolumeCapabilitiesRequest
                                         ) -> Any:
        name = _required(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise InvalidArgument(what="request", detail="volume_capabilities is missing")
        for cap in request.volume_capabilities:
            _required_capability(cap, True)
        volume = await self.catalog.volume(name)
        record = await self.records.get("volumes", name)
        problems = [p for p in (capability_problem(c, volume.fs)
                                for c in request.volume_capabilities) if p]
        if record is not None:
            problems += [f"the volume was created for {'+'.join(record['access'])} access"
                         for c in request.volume_capabilities
                         if _access(c) not in record["access"]][:1]
        try:
            params = _parameters(request.parameters)
        except InvalidOption as e:
            problems.append(e.message)
            params = {}
        have = {"replicas": str(volume.replica_count), "fs": volume.fs}
        problems += [f"the volume has {key}={have[key]}" for key, value in params.items()
                     if value != have[key]]
        if problems:
            return pb.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        return pb.ValidateVolumeCapabilitiesResponse(
            confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters))

    @_rpc
    async def ListVolumes(self, request: pb.ListVolumesRequest) -> Any:
        if request.max_entries < 0:
            raise InvalidArgument(what="max_entries", detail="must not be negative")
        after = _after(request.starting_token) if request.starting_token else ""
        volumes = sorted((v for v in await self.catalog.volumes() if v.name > after),
                         key=lambda v: v.name)
        next_token = ""
        if request.max_entries and len(volumes) > request.max_entries:
            volumes = volumes[:request.max_entries]
            next_token = _token(volumes[-1].name)
        published = await self.records.all("published")
        nodes = sorted(n.name for n in await self.catalog.nodes())
        status = pb.ListVolumesResponse.VolumeStatus
        entries = [pb.ListVolumesResponse.Entry(
            volume=self._volume(v, nodes),
            status=status(published_node_ids=[published[v.name]["node"]]
                          if v.name in published else []))
            for v in volumes]
        return pb.ListVolumesResponse(entries=entries, next_token=next_token)

    @_rpc
    async def GetCapacity(self, request: pb.GetCapacityRequest) -> Any:
        params = _parameters(request.parameters)
        replicas = _replicas(params.get("replicas", PARAMETERS["replicas"]))
        fs = params.get("fs", "")
        maximum = wrappers_pb2.Int64Value(value=MAX_VOLUME_SIZE)
        servers = [s for s in await self.catalog.servers() if s.state is ServerState.UP]
        node = request.accessible_topology.segments.get(TOPOLOGY_KEY)
        usable = (replicas > 0 and len(servers) >= replicas
                  and not any(capability_problem(c, fs) for c in request.volume_capabilities)
                  and (node is None or node in {n.name for n in await self.catalog.nodes()}))
        available = sum(s.free for s in servers) // replicas if usable else 0
        return pb.GetCapacityResponse(available_capacity=available, maximum_volume_size=maximum)

    @_rpc
    async def ControllerGetCapabilities(self, request: pb.ControllerGetCapabilitiesRequest
                                        ) -> Any:
        rpc = pb.ControllerServiceCapability.RPC
        kinds = (rpc.CREATE_DELETE_VOLUME, rpc.PUBLISH_UNPUBLISH_VOLUME, rpc.LIST_VOLUMES,
                 rpc.GET_CAPACITY, rpc.LIST_VOLUMES_PUBLISHED_NODES, rpc.EXPAND_VOLUME)
        return pb.ControllerGetCapabilitiesResponse(capabilities=[
            pb.ControllerServiceCapability(rpc=rpc(type=kind)) for kind in kinds])

    CreateSnapshot = _unimplemented("snapshots")
    DeleteSnapshot = _unimplemented("snapshots")
    ListSnapshots = _unimplemented("snapshots")
    GetSnapshot = _unimplemented("snapshots")
    @_rpc
    async def ControllerExpandVolume(self, request: pb.ControllerExpandVolumeRequest) -> Any:
        """Grow the volume (replicas and record). A mount volume's file system grows in
        NodeExpandVolume; a block volume attached on this node gets its loop device grown
        here, since no NodeExpandVolume follows for it."""
        name = _required(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise InvalidArgument(what="request", detail="capacity_range is missing")
        async with self.lock(name):
            volume = await self.catalog.volume(name)
            size = expanded_size(volume, request.capacity_range)
            if request.HasField("volume_capability"):
                access = _access(_required_capability(request.volume_capability, True))
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
        record = await self.records.get("volumes", volume.name)
        if record is not None:
            return "mount" if "mount" in record["access"] else "block"
        att = volume.attachment
        return "block" if att is not None and att.device and not att.mountpoint else "mount"
    ControllerGetVolume = _unimplemented("ControllerGetVolume")
    ControllerModifyVolume = _unimplemented("volume modification")


# --- Node --------------------------------------------------------------------------------


class NodeState:
    """What CSI staged and published on this host, in a JSON file (survives restarts):
    {volume: {"staging": path, "access": "mount"|"block",
              "targets": {path: {"readonly", "access", "flags", "device"}}}}"""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._volumes: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._volumes = {}

    def get(self, name: str) -> dict[str, Any] | None:
        return self._volumes.get(name)

    def set(self, name: str, entry: dict[str, Any] | None) -> None:
        if entry is None:
            self._volumes.pop(name, None)
        else:
            self._volumes[name] = entry
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._volumes, indent=1))
        os.replace(tmp, self.path)


async def _mounted(path: str) -> bool:
    return await asyncio.to_thread(kernel.is_mounted, path)


def _remove(path: str) -> None:
    """Remove the directory or file NodePublishVolume made at a target path."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, catalog: Catalog, agent: Agent, locks: Locks) -> None:
        self.catalog = catalog
        self.agent = agent
        self.node = agent.node
        self.records = CsiRecords(catalog.store)
        self.state = NodeState(agent.state_dir / "csi-node.json")
        self.lock = locks

    @_rpc
    async def NodeStageVolume(self, request: pb.NodeStageVolumeRequest) -> Any:
        name = _required(request.volume_id, "volume_id")
        staging = _required(request.staging_target_path, "staging_target_path")
        cap = _required_capability(request.volume_capability,
                                   request.HasField("volume_capability"))
        access = _access(cap)
        async with self.lock(name):
            volume = await self.catalog.volume(name)
            problem = capability_problem(cap, volume.fs)
            if problem:
                raise CsiError(Code.FAILED_PRECONDITION, problem)
            published = await self.records.get("published", name)
            if published is not None and published["node"] != self.node:
                raise CsiError(Code.FAILED_PRECONDITION, f"volume {name!r} is published to node "
                               f"{published['node']!r}, not to {self.node!r}")
            entry = self.state.get(name)
            if entry is not None:
                if entry["staging"] != staging:
                    raise CsiError(Code.FAILED_PRECONDITION, f"volume {name!r} is staged at "
                                   f"{entry['staging']}")
                if entry["access"] != access:
                    raise CsiError(Code.ALREADY_EXISTS, f"volume {name!r} is staged at {staging} "
                                   f"for {entry['access']} access")
            record = await self.records.get("volumes", name)
            if (access == "mount" and record is not None and "mount" not in record["access"]
                    and not volume.formatted):
                raise CsiError(Code.FAILED_PRECONDITION, f"volume {name!r} was created for raw "
                               f"block access; mounting it would format it")
            was_here = volume.attachment is not None and volume.attachment.node == self.node
            volume = await self.agent.attach(name, filesystem=access == "mount")
            try:
                assert volume.attachment is not None
                if access == "mount" and not await _mounted(staging):
                    os.makedirs(staging, exist_ok=True)
                    await asyncio.to_thread(kernel.run, ["mount", "--bind",
                                                         volume.attachment.mountpoint, staging])
            except (kernel.HostCommandFailed, OSError):
                if not was_here:  # leave nothing behind
                    with contextlib.suppress(CargoholdError):
                        await self.agent.detach(name)
                raise
            targets = entry["targets"] if entry is not None else {}
            self.state.set(name, {"staging": staging, "access": access, "targets": targets})
        return pb.NodeStageVolumeResponse()

    @_rpc
    async def NodeUnstageVolume(self, request: pb.NodeUnstageVolumeRequest) -> Any:
        name = _required(request.volume_id, "volume_id")
        staging = _required(request.staging_target_path, "staging_target_path")
        async with self.lock(name):
            entry = self.state.get(name)
            if entry is None or entry["staging"] != staging:
                if await self.catalog.find_volume(name) is None:
                    raise VolumeNotFound(name=name)
                return pb.NodeUnstageVolumeResponse()  # not staged there: nothing to undo
            busy = [t for t in entry["targets"] if await _mounted(t)]
            if busy:
                raise CsiError(Code.FAILED_PRECONDITION, f"volume {name!r} is still published at "
                               f"{', '.join(busy)}; unpublish it first")
            if await _mounted(staging):
                await asyncio.to_thread(kernel.unmount, staging)
            volume = await self.catalog.find_volume(name)
            if volume is not None and volume.attachment is not None \
                    and volume.attachment.node == self.node:
                await self.agent.detach(name)
            self.state.set(name, None)
        return pb.NodeUnstageVolumeResponse()

    @_rpc
    async def NodePublishVolume(self, request: pb.NodePublishVolumeRequest) -> Any:
        name = _required(request.volume_id, "volume_id")
        target = _required(request.target_path, "target_path")
        cap = _required_capability(request.volume_capability,
                                   request.HasField("volume_capability"))
        staging = request.staging_target_path
        if not staging:
            raise CsiError(Code.FAILED_PRECONDITION, "staging_target_path is missing; "
                           "NodeStageVolume comes first")
        access = _access(cap)
        readonly = request.readonly or cap.access_mode.mode == Mode.SINGLE_NODE_READER_ONLY
        flags = sorted(set(cap.mount.mount_flags)) if access == "mount" else []
        async with self.lock(name):
            volume = await self.catalog.volume(name)
            problem = capability_problem(cap, volume.fs)
            if problem:
                raise CsiError(Code.FAILED_PRECONDITION, problem)
            entry = self.state.get(name)
            att = volume.attachment
            if entry is None or entry["staging"] != staging or att is None \
                    or att.node != self.node:
                raise CsiError(Code.FAILED_PRECONDITION, f"volume {name!r} is not staged at "
                               f"{staging}; NodeStageVolume comes first")
            if access != entry["access"]:
                raise CsiError(Code.FAILED_PRECONDITION, f"volume {name!r} is staged for "
                               f"{entry['access']} access, not {access}")
            wanted = {"readonly": readonly, "access": access, "flags": flags}
            current = entry["targets"].get(target)
            if current is not None and await _mounted(target):
                if {k: current[k] for k in wanted} != wanted:
                    raise CsiError(Code.ALREADY_EXISTS, f"volume {name!r} is published at "
                                   f"{target} with other arguments")
                return pb.NodePublishVolumeResponse()
            if access == "mount":
                device = ""
                os.makedirs(target, exist_ok=True)
                await self._bind(staging, target, [*flags, "ro"] if readonly else flags)
            else:
                device = await self._block_device(name, att.device, readonly)
                Path(target).touch()
                try:
                    await self._bind(device, target, [])
                except (kernel.HostCommandFailed, OSError):
                    if device != att.device:
                        await asyncio.to_thread(kernel.detach_loop, device)
                    raise
            entry["targets"][target] = {**wanted, "device": device}
            self.state.set(name, entry)
        return pb.NodePublishVolumeResponse()

    async def _bind(self, source: str, target: str, flags: list[str]) -> None:
        await asyncio.to_thread(kernel.run, ["mount", "--bind", source, target])
        if flags:
            try:
                await asyncio.to_thread(kernel.run, ["mount", "-o", ",".join(
                    ["remount", "bind", *flags]), target])
            except kernel.HostCommandFailed:
                await asyncio.to_thread(kernel.unmount, target)
                raise

    async def _block_device(self, name: str, device: str, readonly: bool) -> str:
        """The attachment's loop device, or for read-only access a second, read-only loop
        device on the same engine file (a read-only bind mount of a device node does not
        stop writes to the device)."""
        if not readonly:
            return device
        backing = str(EngineDir(self.agent.state_dir, name).file)
        return (await asyncio.to_thread(kernel.run, [
            "losetup", "--find", "--show", "--read-only", "--direct-io=on", "--sector-size",
            "4096", backing])).strip()

    @_rpc
    async def NodeUnpublishVolume(self, request: pb.NodeUnpublishVolumeRequest) -> Any:
        name = _required(request.volume_id, "volume_id")
        target = _required(request.target_path, "target_path")
        async with self.lock(name):
            entry = self.state.get(name)
            current = entry["targets"].get(target) if entry is not None else None
            mounted = await _mounted(target)
            if current is None and not mounted:
                if await self.catalog.find_volume(name) is None:
                    raise VolumeNotFound(name=name)
                return pb.NodeUnpublishVolumeResponse()  # not published there
            if mounted:
                await asyncio.to_thread(kernel.unmount, target)
            volume = await self.catalog.find_volume(name)
            primary = volume.attachment.device if volume and volume.attachment else ""
            device = current["device"] if current is not None else ""
            if device and device != primary:  # the read-only loop device of this target
                with contextlib.suppress(kernel.HostCommandFailed):
                    await asyncio.to_thread(kernel.detach_loop, device)
            await asyncio.to_thread(_remove, target)
            if entry is not None:
                entry["targets"].pop(target, None)
                self.state.set(name, entry)
        return pb.NodeUnpublishVolumeResponse()

    @_rpc
    async def NodeGetVolumeStats(self, request: pb.NodeGetVolumeStatsRequest) -> Any:
        name = _required(request.volume_id, "volume_id")
        path = _required(request.volume_path, "volume_path")
        await self.catalog.volume(name)
        if not os.path.exists(path) or not await _mounted(path):
            raise CsiError(Code.NOT_FOUND, f"volume {name!r} is not at {path}")
        usage = pb.VolumeUsage
        if stat.S_ISBLK(os.stat(path).st_mode):
            fd = os.open(path, os.O_RDONLY)
            try:
                total = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
            return pb.NodeGetVolumeStatsResponse(usage=[usage(unit=usage.BYTES, total=total)])
        fs = os.statvfs(path)
        return pb.NodeGetVolumeStatsResponse(usage=[
            usage(unit=usage.BYTES, total=fs.f_blocks * fs.f_frsize,
                  available=fs.f_bavail * fs.f_frsize,
                  used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize),
            usage(unit=usage.INODES, total=fs.f_files, available=fs.f_favail,
                  used=fs.f_files - fs.f_ffree)])

    @_rpc
    async def NodeGetCapabilities(self, request: pb.NodeGetCapabilitiesRequest) -> Any:
        rpc = pb.NodeServiceCapability.RPC
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=rpc(type=kind))
            for kind in (rpc.STAGE_UNSTAGE_VOLUME, rpc.GET_VOLUME_STATS, rpc.EXPAND_VOLUME)])

    @_rpc
    async def NodeGetInfo(self, request: pb.NodeGetInfoRequest) -> Any:
        return pb.NodeGetInfoResponse(node_id=self.node, max_volumes_per_node=MAX_VOLUMES_PER_NODE,
                                      accessible_topology=_topology(self.node))

    @_rpc
    async def NodeExpandVolume(self, request: pb.NodeExpandVolumeRequest) -> Any:
        """Make this node's attachment follow the grown volume: engine and loop device, then
        (mount access) the file system, online. The file system at ``volume_path`` is the
        agent's mount (bind-mounted there), so growing that mount grows it."""
        name = _required(request.volume_id, "volume_id")
        path = _required(request.volume_path, "volume_path")
        async with self.lock(name):
            volume = await self.catalog.volume(name)
            if not os.path.exists(path) or not await _mounted(path):
                raise CsiError(Code.NOT_FOUND, f"volume {name!r} is not at {path}")
            capacity = request.capacity_range
            if capacity.required_bytes > volume.size or (
                    capacity.limit_bytes and capacity.limit_bytes < volume.size):
                raise CsiError(Code.OUT_OF_RANGE, f"volume {name!r} is "
                               f"{format_size(volume.size)} ({volume.size} bytes), outside "
                               f"capacity_range [{capacity.required_bytes}, "
                               f"{capacity.limit_bytes or 'no limit'}]; ControllerExpandVolume "
                               f"grows it")
            if request.HasField("volume_capability"):
                access = _access(_required_capability(request.volume_capability, True))
            else:
                access = "block" if stat.S_ISBLK(os.stat(path).st_mode) else "mount"
            att = volume.attachment
            if att is None or att.node != self.node:
                if access == "block":
                    return pb.NodeExpandVolumeResponse(capacity_bytes=volume.size)
                raise CsiError(Code.FAILED_PRECONDITION, f"volume {name!r} is not staged on "
                               f"node {self.node!r}")
            volume = await self.agent.expand(name)  # block: stops at the loop device
        return pb.NodeExpandVolumeResponse(capacity_bytes=volume.size)


# --- serving -------------------------------------------------------------------------------


async def serve(path: str, catalog: Catalog, volumes: VolumeService, agent: Agent,
                ready: Callable[[], bool]) -> Any:
    """Serve the driver on the unix socket ``path``; return the started ``grpc.aio`` server."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket of a crashed node
    server = grpc.aio.server()
    locks = Locks()
    pb_grpc.add_IdentityServicer_to_server(Identity(catalog, ready), server)
    pb_grpc.add_ControllerServicer_to_server(Controller(catalog, volumes, agent, locks), server)
    pb_grpc.add_NodeServicer_to_server(NodeService(catalog, agent, locks), server)
    try:
        bound = server.add_insecure_port(f"unix://{path}")
    except RuntimeError as e:  # newer grpcio raises instead of returning 0
        raise CargoholdError(detail=f"cannot serve CSI on unix://{path}: {e}") from e
    if not bound:
        raise CargoholdError(detail=f"cannot serve CSI on unix://{path}")
    await server.start()
    os.chmod(path, 0o660)
    return server
