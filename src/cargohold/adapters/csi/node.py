"""The CSI Node service: stage, publish, expand and report the volumes used on this host."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from cargohold.adapters.csi import csi_pb2 as pb
from cargohold.adapters.csi import csi_pb2_grpc as pb_grpc
from cargohold.adapters.csi.rpc import (
    MAX_VOLUMES_PER_NODE,
    Code,
    Locks,
    Mode,
    access_type,
    capability_problem,
    refused,
    required,
    required_capability,
    rpc,
    topology,
)
from cargohold.clients import kernel
from cargohold.core.sizes import format_size
from cargohold.errors import (
    CargoholdError,
    HostCommandFailed,
    InvalidArgument,
    VolumeNotFound,
)
from cargohold.services.agent import Agent, EngineDir
from cargohold.stores.auditlog import AuditLog
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)


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


class CsiNode(pb_grpc.NodeServicer):
    def __init__(self, catalog: Catalog, agent: Agent, locks: Locks, kubelet_dir: Path,
                 audit: AuditLog | None = None) -> None:
        self.audit = audit  # every change is written there (``rpc``)
        self.catalog = catalog
        self.agent = agent
        self.kubelet_dir = os.path.realpath(kubelet_dir)
        self.node = agent.node
        self.state = NodeState(agent.state_dir / "csi-node.json")
        self.lock = locks

    def _confined(self, path: str, field: str) -> str:
        """``path`` if it lies inside the kubelet directory once every symbolic link is
        followed (a request cannot make the driver mount over /etc, say)."""
        required(path, field)
        real = os.path.realpath(path)
        if not os.path.isabs(path) or os.path.commonpath([real, self.kubelet_dir]) != \
                self.kubelet_dir or real == self.kubelet_dir:
            raise InvalidArgument(what=field, detail=f"{path!r} is not inside the kubelet "
                                  f"directory {self.kubelet_dir} (--csi-kubelet-dir)")
        return path

    @rpc
    async def NodeStageVolume(self, request: pb.NodeStageVolumeRequest) -> Any:
        name = required(request.volume_id, "volume_id")
        staging = self._confined(request.staging_target_path, "staging_target_path")
        cap = required_capability(request.volume_capability,
                                   request.HasField("volume_capability"))
        access = access_type(cap)
        async with self.lock(name):
            volume = await self.catalog.volume(name)
            problem = capability_problem(cap, volume.fs)
            if problem:
                raise refused(Code.FAILED_PRECONDITION, problem)
            published = await self.catalog.csi_record("published", name)
            if published is not None and published["node"] != self.node:
                raise refused(Code.FAILED_PRECONDITION, f"volume {name!r} is published to node "
                               f"{published['node']!r}, not to {self.node!r}")
            entry = self.state.get(name)
            if entry is not None:
                if entry["staging"] != staging:
                    raise refused(Code.FAILED_PRECONDITION, f"volume {name!r} is staged at "
                                   f"{entry['staging']}")
                if entry["access"] != access:
                    raise refused(Code.ALREADY_EXISTS, f"volume {name!r} is staged at {staging} "
                                   f"for {entry['access']} access")
            record = await self.catalog.csi_record("volumes", name)
            if (access == "mount" and record is not None and "mount" not in record["access"]
                    and not volume.formatted):
                raise refused(Code.FAILED_PRECONDITION, f"volume {name!r} was created for raw "
                               f"block access; mounting it would format it")
            was_here = volume.attachment is not None and volume.attachment.node == self.node
            volume = await self.agent.attach(name, filesystem=access == "mount")
            try:
                assert volume.attachment is not None
                if access == "mount" and not await _mounted(staging):
                    os.makedirs(staging, exist_ok=True)
                    await asyncio.to_thread(kernel.run, ["mount", "--bind",
                                                         volume.attachment.mountpoint, staging])
            except (HostCommandFailed, OSError):
                if not was_here:  # leave nothing behind
                    with contextlib.suppress(CargoholdError):
                        await self.agent.detach(name)
                raise
            targets = entry["targets"] if entry is not None else {}
            self.state.set(name, {"staging": staging, "access": access, "targets": targets})
        return pb.NodeStageVolumeResponse()

    @rpc
    async def NodeUnstageVolume(self, request: pb.NodeUnstageVolumeRequest) -> Any:
        name = required(request.volume_id, "volume_id")
        staging = self._confined(request.staging_target_path, "staging_target_path")
        async with self.lock(name):
            entry = self.state.get(name)
            if entry is None or entry["staging"] != staging:
                if await self.catalog.find_volume(name) is None:
                    raise VolumeNotFound(name=name)
                return pb.NodeUnstageVolumeResponse()  # not staged there: nothing to undo
            busy = [t for t in entry["targets"] if await _mounted(t)]
            if busy:
                raise refused(Code.FAILED_PRECONDITION, f"volume {name!r} is still published at "
                               f"{', '.join(busy)}; unpublish it first")
            if await _mounted(staging):
                await asyncio.to_thread(kernel.unmount, staging)
            volume = await self.catalog.find_volume(name)
            if volume is not None and volume.attachment is not None \
                    and volume.attachment.node == self.node:
                await self.agent.detach(name)
            self.state.set(name, None)
        return pb.NodeUnstageVolumeResponse()

    @rpc
    async def NodePublishVolume(self, request: pb.NodePublishVolumeRequest) -> Any:
        name = required(request.volume_id, "volume_id")
        target = self._confined(request.target_path, "target_path")
        cap = required_capability(request.volume_capability,
                                   request.HasField("volume_capability"))
        if not request.staging_target_path:
            raise refused(Code.FAILED_PRECONDITION, "staging_target_path is missing; "
                           "NodeStageVolume comes first")
        staging = self._confined(request.staging_target_path, "staging_target_path")
        access = access_type(cap)
        readonly = request.readonly or cap.access_mode.mode == Mode.SINGLE_NODE_READER_ONLY
        flags = sorted(set(cap.mount.mount_flags)) if access == "mount" else []
        async with self.lock(name):
            volume = await self.catalog.volume(name)
            problem = capability_problem(cap, volume.fs)
            if problem:
                raise refused(Code.FAILED_PRECONDITION, problem)
            entry = self.state.get(name)
            att = volume.attachment
            if entry is None or entry["staging"] != staging or att is None \
                    or att.node != self.node:
                raise refused(Code.FAILED_PRECONDITION, f"volume {name!r} is not staged at "
                               f"{staging}; NodeStageVolume comes first")
            if access != entry["access"]:
                raise refused(Code.FAILED_PRECONDITION, f"volume {name!r} is staged for "
                               f"{entry['access']} access, not {access}")
            wanted = {"readonly": readonly, "access": access, "flags": flags}
            current = entry["targets"].get(target)
            if current is not None and await _mounted(target):
                if {k: current[k] for k in wanted} != wanted:
                    raise refused(Code.ALREADY_EXISTS, f"volume {name!r} is published at "
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
                except (HostCommandFailed, OSError):
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
            except HostCommandFailed:
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

    @rpc
    async def NodeUnpublishVolume(self, request: pb.NodeUnpublishVolumeRequest) -> Any:
        name = required(request.volume_id, "volume_id")
        target = self._confined(request.target_path, "target_path")
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
                with contextlib.suppress(HostCommandFailed):
                    await asyncio.to_thread(kernel.detach_loop, device)
            await asyncio.to_thread(_remove, target)
            if entry is not None:
                entry["targets"].pop(target, None)
                self.state.set(name, entry)
        return pb.NodeUnpublishVolumeResponse()

    @rpc
    async def NodeGetVolumeStats(self, request: pb.NodeGetVolumeStatsRequest) -> Any:
        name = required(request.volume_id, "volume_id")
        path = self._confined(request.volume_path, "volume_path")
        await self.catalog.volume(name)
        if not os.path.exists(path) or not await _mounted(path):
            raise refused(Code.NOT_FOUND, f"volume {name!r} is not at {path}")
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

    @rpc
    async def NodeGetCapabilities(self, request: pb.NodeGetCapabilitiesRequest) -> Any:
        rpc = pb.NodeServiceCapability.RPC
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=rpc(type=kind))
            for kind in (rpc.STAGE_UNSTAGE_VOLUME, rpc.GET_VOLUME_STATS, rpc.EXPAND_VOLUME)])

    @rpc
    async def NodeGetInfo(self, request: pb.NodeGetInfoRequest) -> Any:
        return pb.NodeGetInfoResponse(node_id=self.node, max_volumes_per_node=MAX_VOLUMES_PER_NODE,
                                      accessible_topology=topology(self.node))

    @rpc
    async def NodeExpandVolume(self, request: pb.NodeExpandVolumeRequest) -> Any:
        """Make this node's attachment follow the grown volume: engine and loop device, then
        (mount access) the file system, online. The file system at ``volume_path`` is the
        agent's mount (bind-mounted there), so growing that mount grows it."""
        name = required(request.volume_id, "volume_id")
        path = self._confined(request.volume_path, "volume_path")
        async with self.lock(name):
            volume = await self.catalog.volume(name)
            if not os.path.exists(path) or not await _mounted(path):
                raise refused(Code.NOT_FOUND, f"volume {name!r} is not at {path}")
            capacity = request.capacity_range
            if capacity.required_bytes > volume.size or (
                    capacity.limit_bytes and capacity.limit_bytes < volume.size):
                raise refused(Code.OUT_OF_RANGE, f"volume {name!r} is "
                               f"{format_size(volume.size)} ({volume.size} bytes), outside "
                               f"capacity_range [{capacity.required_bytes}, "
                               f"{capacity.limit_bytes or 'no limit'}]; ControllerExpandVolume "
                               f"grows it")
            if request.HasField("volume_capability"):
                access = access_type(required_capability(request.volume_capability, True))
            else:
                access = "block" if stat.S_ISBLK(os.stat(path).st_mode) else "mount"
            att = volume.attachment
            if att is None or att.node != self.node:
                if access == "block":
                    return pb.NodeExpandVolumeResponse(capacity_bytes=volume.size)
                raise refused(Code.FAILED_PRECONDITION, f"volume {name!r} is not staged on "
                               f"node {self.node!r}")
            volume = await self.agent.expand(name)  # block: stops at the loop device
        return pb.NodeExpandVolumeResponse(capacity_bytes=volume.size)


