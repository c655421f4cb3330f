"""The CSI driver against a real node, through the generated gRPC stubs (root: mounts, loop).

Every staging and target path lives under the test's tmp_path, which is the node's base
directory: the Node fixture's cleanup unmounts and detaches everything there, also after a
failed test.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cargohold import __version__
from cargohold.adapters.csi import csi_pb2 as pb
from cargohold.adapters.csi import csi_pb2_grpc as stubs
from cargohold.core.models import Attachment, Volume
from cargohold.core.models import Node as NodeRecord
from cargohold.stores.catalog import Catalog
from cargohold.stores.opener import open_store
from tests.conftest import Node, leftovers, needs_root

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20
GIB = 1 << 30
Code = grpc.StatusCode
Mode = pb.VolumeCapability.AccessMode
TIMEOUT = 120


def mount_cap(fs: str = "", mode: int = Mode.SINGLE_NODE_WRITER,
              flags: tuple[str, ...] = ()) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs, mount_flags=list(flags)),
        access_mode=Mode(mode=mode))


def block_cap(mode: int = Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode))


class Csi:
    """Stubs of the three services on one node's CSI socket, with call helpers."""

    def __init__(self, node: Node, socket: Path) -> None:
        self.node = node
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.identity = stubs.IdentityStub(self.channel)
        self.controller = stubs.ControllerStub(self.channel)
        self.nodes = stubs.NodeStub(self.channel)

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, timeout=TIMEOUT)

    def fails(self, code: grpc.StatusCode, method: Callable[..., Any], request: Any) -> str:
        with pytest.raises(grpc.RpcError) as raised:
            method(request, timeout=TIMEOUT)
        error: Any = raised.value
        assert error.code() == code, f"{error.code()}: {error.details()}"
        return str(error.details())

    def create(self, name: str, size: int = 64 * MIB, caps: tuple[pb.VolumeCapability, ...]
               = (mount_cap(),), **parameters: str) -> pb.Volume:
        return self.call(self.controller.CreateVolume, pb.CreateVolumeRequest(
            name=name, capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=list(caps), parameters=parameters)).volume

    def stage(self, volume_id: str, staging: Path, cap: pb.VolumeCapability) -> None:
        staging.mkdir(parents=True, exist_ok=True)  # the CO makes the staging directory
        self.call(self.nodes.NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap))

    def unstage(self, volume_id: str, staging: Path) -> None:
        self.call(self.nodes.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging)))

    def publish_request(self, volume_id: str, staging: Path, target: Path,
                        cap: pb.VolumeCapability, readonly: bool = False
                        ) -> pb.NodePublishVolumeRequest:
        return pb.NodePublishVolumeRequest(volume_id=volume_id, staging_target_path=str(staging),
                                           target_path=str(target), volume_capability=cap,
                                           readonly=readonly)

    def publish(self, volume_id: str, staging: Path, target: Path, cap: pb.VolumeCapability,
                readonly: bool = False) -> None:
        self.call(self.nodes.NodePublishVolume,
                  self.publish_request(volume_id, staging, target, cap, readonly))

    def unpublish(self, volume_id: str, target: Path) -> None:
        self.call(self.nodes.NodeUnpublishVolume,
                  pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)))

    def stats(self, volume_id: str, path: Path) -> dict[str, pb.VolumeUsage]:
        usage = self.call(self.nodes.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=str(path))).usage
        return {pb.VolumeUsage.Unit.Name(u.unit): u for u in usage}


@pytest.fixture
def csi(tmp_path: Path) -> Iterator[Csi]:
    socket = tmp_path / "csi.sock"
    node = Node(tmp_path, extra=("--csi-endpoint", f"unix://{socket}",
                                 "--csi-kubelet-dir", str(tmp_path)))
    client = None
    try:
        node.start()
        client = Csi(node, socket)
        yield client
    finally:
        if client is not None:
            client.channel.close()
        print(node.logs())  # pytest shows it when the test failed
        node.cleanup()


def _catalog_change(node: Node, change: Callable[[Catalog], Any]) -> None:
    async def run() -> None:
        store = open_store(f"sqlite://{node.state / 'meta.db'}")
        try:
            await change(Catalog(store))
        finally:
            await store.close()

    asyncio.run(run())


def _add_node(node: Node, name: str) -> None:
    _catalog_change(node, lambda catalog: catalog.put_node(NodeRecord(name=name)))


def _set_attachment(node: Node, volume: str, attachment: Attachment | None) -> None:
    def change(v: Volume) -> Volume:
        v.attachment = attachment
        return v

    _catalog_change(node, lambda catalog: catalog.update_volume(volume, change))


def _mounts_under(base: Path) -> list[str]:
    return leftovers(base)["mounts"]


def _inspect(node: Node, name: str) -> dict[str, Any]:
    volume = node.json("volume", "inspect", name)
    assert isinstance(volume, dict)
    return volume


# --- Identity and capabilities ---------------------------------------------------------


def test_identity_and_capabilities(csi: Csi) -> None:
    info = csi.call(csi.identity.GetPluginInfo, pb.GetPluginInfoRequest())
    assert (info.name, info.vendor_version) == ("cargohold.io", __version__)
    caps = csi.call(csi.identity.GetPluginCapabilities, pb.GetPluginCapabilitiesRequest())
    service = pb.PluginCapability.Service
    assert sorted(c.service.type for c in caps.capabilities if c.HasField("service")) == [
        service.CONTROLLER_SERVICE, service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
        service.GROUP_CONTROLLER_SERVICE]
    expansion = pb.PluginCapability.VolumeExpansion
    assert [c.volume_expansion.type for c in caps.capabilities
            if c.HasField("volume_expansion")] == [expansion.ONLINE]
    probe = csi.call(csi.identity.Probe, pb.ProbeRequest())
    assert probe.HasField("ready") and probe.ready.value

    rpc = pb.ControllerServiceCapability.RPC
    caps = csi.call(csi.controller.ControllerGetCapabilities,
                    pb.ControllerGetCapabilitiesRequest())
    assert sorted(c.rpc.type for c in caps.capabilities) == sorted([
        rpc.CREATE_DELETE_VOLUME, rpc.PUBLISH_UNPUBLISH_VOLUME, rpc.LIST_VOLUMES,
        rpc.GET_CAPACITY, rpc.LIST_VOLUMES_PUBLISHED_NODES, rpc.EXPAND_VOLUME,
        rpc.CREATE_DELETE_SNAPSHOT, rpc.LIST_SNAPSHOTS, rpc.CLONE_VOLUME, rpc.GET_SNAPSHOT,
        rpc.MODIFY_VOLUME])
    group = stubs.GroupControllerStub(csi.channel)
    caps = csi.call(group.GroupControllerGetCapabilities,
                    pb.GroupControllerGetCapabilitiesRequest())
    assert [c.rpc.type for c in caps.capabilities] == [
        pb.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
    node_rpc = pb.NodeServiceCapability.RPC
    caps = csi.call(csi.nodes.NodeGetCapabilities, pb.NodeGetCapabilitiesRequest())
    assert sorted(c.rpc.type for c in caps.capabilities) == [
        node_rpc.STAGE_UNSTAGE_VOLUME, node_rpc.GET_VOLUME_STATS, node_rpc.EXPAND_VOLUME]
    info = csi.call(csi.nodes.NodeGetInfo, pb.NodeGetInfoRequest())
    assert info.node_id == "node1" and info.max_volumes_per_node > 0
    assert dict(info.accessible_topology.segments) == {"cargohold.io/node": "node1"}


def test_what_is_not_served_is_unimplemented(csi: Csi) -> None:
    csi.fails(Code.UNIMPLEMENTED, csi.controller.ControllerGetVolume,
              pb.ControllerGetVolumeRequest(volume_id="v"))
    metadata = csi.channel.unary_unary("/csi.v1.SnapshotMetadata/GetMetadataAllocated",
                                       request_serializer=bytes, response_deserializer=bytes)
    csi.fails(Code.UNIMPLEMENTED, metadata, b"")


# --- Controller ------------------------------------------------------------------------


def test_create_volume_is_idempotent_and_refuses_what_it_cannot_do(csi: Csi) -> None:
    create = csi.controller.CreateVolume
    volume = csi.create("pvc-1", 100 * MIB, replicas="3")
    assert (volume.volume_id, volume.capacity_bytes) == ("pvc-1", 100 * MIB)
    assert [dict(t.segments) for t in volume.accessible_topology] == [
        {"cargohold.io/node": "node1"}]
    assert csi.create("pvc-1", 100 * MIB, replicas="3") == volume  # same request, same volume
    again = csi.call(create, pb.CreateVolumeRequest(  # a compatible range finds it too
        name="pvc-1", volume_capabilities=[mount_cap()], parameters={"replicas": "3"},
        capacity_range=pb.CapacityRange(required_bytes=50 * MIB, limit_bytes=200 * MIB)))
    assert again.volume == volume
    inspected = _inspect(csi.node, "pvc-1")
    assert (inspected["size"], inspected["replica_count"], inspected["fs"]) == (
        100 * MIB, 3, "ext4")

    csi.fails(Code.ALREADY_EXISTS, create, pb.CreateVolumeRequest(  # incompatible size
        name="pvc-1", volume_capabilities=[mount_cap()], parameters={"replicas": "3"},
        capacity_range=pb.CapacityRange(required_bytes=200 * MIB)))
    csi.fails(Code.ALREADY_EXISTS, create, pb.CreateVolumeRequest(  # incompatible replicas
        name="pvc-1", volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=100 * MIB)))
    csi.fails(Code.ALREADY_EXISTS, create, pb.CreateVolumeRequest(  # incompatible access
        name="pvc-1", volume_capabilities=[block_cap()], parameters={"replicas": "3"},
        capacity_range=pb.CapacityRange(required_bytes=100 * MIB)))

    csi.node.cli("volume", "create", "by-cli", "--size", "64M")
    assert "not created through CSI" in csi.fails(Code.ALREADY_EXISTS, create,
                                                    pb.CreateVolumeRequest(
        name="by-cli", volume_capabilities=[mount_cap()]))

    details = csi.fails(Code.INVALID_ARGUMENT, create, pb.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[mount_cap()], parameters={"color": "red"}))
    assert "color" in details
    csi.fails(Code.INVALID_ARGUMENT, create, pb.CreateVolumeRequest(
        volume_capabilities=[mount_cap()]))  # no name
    csi.fails(Code.INVALID_ARGUMENT, create, pb.CreateVolumeRequest(name="pvc-2"))  # no caps
    csi.fails(Code.INVALID_ARGUMENT, create, pb.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]))
    csi.fails(Code.INVALID_ARGUMENT, create, pb.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[mount_cap(fs="btrfs")]))
    csi.fails(Code.INVALID_ARGUMENT, create, pb.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[mount_cap()], parameters={"replicas": "two"}))
    csi.fails(Code.NOT_FOUND, create, pb.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[mount_cap()],
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="s"))))
    csi.fails(Code.OUT_OF_RANGE, create, pb.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(limit_bytes=8 * MIB)))  # below the 16 MiB minimum
    csi.fails(Code.OUT_OF_RANGE, create, pb.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=65 << 40)))  # above 64 TiB
    csi.fails(Code.OUT_OF_RANGE, create, pb.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[mount_cap()], parameters={"fs": "xfs"},
        capacity_range=pb.CapacityRange(limit_bytes=100 * MIB)))  # xfs needs 300 MiB
    csi.fails(Code.RESOURCE_EXHAUSTED, create, pb.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[mount_cap()], parameters={"replicas": "4"}))
    csi.fails(Code.RESOURCE_EXHAUSTED, create, pb.CreateVolumeRequest(
        name="pvc-2", volume_capabilities=[mount_cap()],
        accessibility_requirements=pb.TopologyRequirement(requisite=[
            pb.Topology(segments={"cargohold.io/node": "elsewhere"})])))
    listed = csi.call(csi.controller.ListVolumes, pb.ListVolumesRequest())
    assert sorted(e.volume.volume_id for e in listed.entries) == ["by-cli", "pvc-1"]

    # defaults (1 GiB, 2 replicas, ext4), xfs from the capability's fs_type
    volume = csi.call(create, pb.CreateVolumeRequest(name="pvc-3", volume_capabilities=[
        mount_cap(fs="xfs")])).volume
    assert volume.capacity_bytes == 1 << 30
    inspected = _inspect(csi.node, "pvc-3")
    assert (inspected["replica_count"], inspected["fs"]) == (2, "xfs")
    csi.fails(Code.INVALID_ARGUMENT, create, pb.CreateVolumeRequest(  # fs and fs_type clash
        name="pvc-4", volume_capabilities=[mount_cap(fs="xfs")], parameters={"fs": "ext4"}))

    # a CSI name cargohold cannot use as it is maps to a stable, valid volume ID
    long_name = "pvc-" + "x" * 80 + " with spaces/and slashes"
    first = csi.create(long_name)
    assert first.volume_id != long_name and len(first.volume_id) <= 63
    assert first.volume_id.startswith("pvc-xxx")
    assert csi.create(long_name) == first
    assert _inspect(csi.node, first.volume_id)["size"] == 64 * MIB


def test_delete_volume(csi: Csi) -> None:
    delete = csi.controller.DeleteVolume
    volume = csi.create("pvc-del")
    csi.call(delete, pb.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert "pvc-del" not in csi.node.cli("volume", "ls").stdout
    csi.call(delete, pb.DeleteVolumeRequest(volume_id=volume.volume_id))  # again: fine
    csi.call(delete, pb.DeleteVolumeRequest(volume_id="never-existed"))
    csi.fails(Code.INVALID_ARGUMENT, delete, pb.DeleteVolumeRequest())
    assert csi.create("pvc-del") == volume  # the name is free again


def test_controller_publish_unpublish(csi: Csi) -> None:
    publish, unpublish = csi.controller.ControllerPublishVolume, \
        csi.controller.ControllerUnpublishVolume
    csi.create("pvc-pub")
    _add_node(csi.node, "node2")

    def request(node: str = "node1", readonly: bool = False, volume: str = "pvc-pub",
                cap: pb.VolumeCapability | None = None) -> pb.ControllerPublishVolumeRequest:
        return pb.ControllerPublishVolumeRequest(volume_id=volume, node_id=node,
                                                 volume_capability=cap or mount_cap(),
                                                 readonly=readonly)

    def published() -> list[str]:
        listed = csi.call(csi.controller.ListVolumes, pb.ListVolumesRequest())
        return [node for e in listed.entries if e.volume.volume_id == "pvc-pub"
                for node in e.status.published_node_ids]

    csi.call(publish, request())
    csi.call(publish, request())  # idempotent
    assert published() == ["node1"]
    csi.fails(Code.ALREADY_EXISTS, publish, request(readonly=True))
    assert "node1" in csi.fails(Code.FAILED_PRECONDITION, publish, request(node="node2"))
    csi.fails(Code.NOT_FOUND, publish, request(volume="no-such-volume"))
    csi.fails(Code.NOT_FOUND, publish, request(node="no-such-node"))
    csi.fails(Code.INVALID_ARGUMENT, publish, pb.ControllerPublishVolumeRequest(
        volume_id="pvc-pub", node_id="node1"))
    csi.fails(Code.INVALID_ARGUMENT, publish, request(cap=mount_cap(
        mode=Mode.MULTI_NODE_READER_ONLY)))

    # published to node2: node1 may not stage it
    csi.call(unpublish, pb.ControllerUnpublishVolumeRequest(volume_id="pvc-pub",
                                                            node_id="node2"))  # not there: ok
    assert published() == ["node1"]
    csi.call(unpublish, pb.ControllerUnpublishVolumeRequest(volume_id="pvc-pub",
                                                            node_id="node1"))
    csi.call(unpublish, pb.ControllerUnpublishVolumeRequest(volume_id="pvc-pub",
                                                            node_id="node1"))  # again: ok
    assert published() == []
    csi.call(publish, request(node="node2"))
    assert published() == ["node2"]
    staging = csi.node.base / "staging"
    assert "node2" in csi.fails(Code.FAILED_PRECONDITION, csi.nodes.NodeStageVolume,
                                pb.NodeStageVolumeRequest(volume_id="pvc-pub",
                                                          staging_target_path=str(staging),
                                                          volume_capability=mount_cap()))
    csi.call(unpublish, pb.ControllerUnpublishVolumeRequest(volume_id="pvc-pub"))  # any node
    assert published() == []
    csi.call(unpublish, pb.ControllerUnpublishVolumeRequest(volume_id="no-such-volume",
                                                            node_id="node1"))

    # attached on another node: publishing it here is refused
    _set_attachment(csi.node, "pvc-pub", Attachment(node="node2", epoch=7))
    assert "node2" in csi.fails(Code.FAILED_PRECONDITION, publish, request())
    _set_attachment(csi.node, "pvc-pub", None)
    csi.call(publish, request())


def test_validate_volume_capabilities(csi: Csi) -> None:
    validate = csi.controller.ValidateVolumeCapabilities
    csi.create("pvc-val", replicas="2")
    for caps in ([mount_cap()], [mount_cap(fs="ext4", flags=("noatime",))],
                 [mount_cap(mode=Mode.SINGLE_NODE_READER_ONLY)]):
        answer = csi.call(validate, pb.ValidateVolumeCapabilitiesRequest(
            volume_id="pvc-val", volume_capabilities=caps, parameters={"replicas": "2"}))
        assert list(answer.confirmed.volume_capabilities) == caps, answer.message
    for caps, params in (([mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)], {}),
                         ([mount_cap(fs="xfs")], {}), ([block_cap()], {}),
                         ([mount_cap(flags=("data=journal",))], {}),
                         ([mount_cap()], {"replicas": "3"})):
        answer = csi.call(validate, pb.ValidateVolumeCapabilitiesRequest(
            volume_id="pvc-val", volume_capabilities=caps, parameters=params))
        assert not answer.HasField("confirmed") and answer.message
    csi.fails(Code.NOT_FOUND, validate, pb.ValidateVolumeCapabilitiesRequest(
        volume_id="no-such-volume", volume_capabilities=[mount_cap()]))
    csi.fails(Code.INVALID_ARGUMENT, validate, pb.ValidateVolumeCapabilitiesRequest(
        volume_id="pvc-val"))
    csi.fails(Code.INVALID_ARGUMENT, validate, pb.ValidateVolumeCapabilitiesRequest(
        volume_capabilities=[mount_cap()]))


def test_list_volumes_pages_through_everything(csi: Csi) -> None:
    names = [f"pvc-list-{i}" for i in range(7)]
    for name in names:
        csi.create(name, 16 * MIB, replicas="1")
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = csi.call(csi.controller.ListVolumes,
                        pb.ListVolumesRequest(max_entries=3, starting_token=token))
        assert len(page.entries) <= 3
        seen += [e.volume.volume_id for e in page.entries]
        assert all(e.volume.capacity_bytes == 16 * MIB for e in page.entries)
        pages += 1
        token = page.next_token
        if not token:
            break
    assert (seen, pages) == (names, 3)
    everything = csi.call(csi.controller.ListVolumes, pb.ListVolumesRequest())
    assert [e.volume.volume_id for e in everything.entries] == names
    assert not everything.next_token
    csi.fails(Code.ABORTED, csi.controller.ListVolumes,
              pb.ListVolumesRequest(starting_token="not-a-token"))
    csi.fails(Code.INVALID_ARGUMENT, csi.controller.ListVolumes,
              pb.ListVolumesRequest(max_entries=-1))
    # a volume removed between two pages does not break the listing
    first = csi.call(csi.controller.ListVolumes, pb.ListVolumesRequest(max_entries=2))
    csi.call(csi.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=names[1]))
    rest = csi.call(csi.controller.ListVolumes, pb.ListVolumesRequest(
        starting_token=first.next_token))
    assert [e.volume.volume_id for e in rest.entries] == names[2:]


def test_get_capacity(csi: Csi) -> None:
    get = csi.controller.GetCapacity
    two = csi.call(get, pb.GetCapacityRequest())
    assert two.available_capacity > 0 and two.maximum_volume_size.value == 64 << 40
    one = csi.call(get, pb.GetCapacityRequest(parameters={"replicas": "1"}))
    assert one.available_capacity > two.available_capacity  # free space / replicas
    here = csi.call(get, pb.GetCapacityRequest(accessible_topology=pb.Topology(
        segments={"cargohold.io/node": "node1"}), volume_capabilities=[mount_cap()]))
    assert here.available_capacity > 0
    for request in (pb.GetCapacityRequest(parameters={"replicas": "4"}),
                    pb.GetCapacityRequest(volume_capabilities=[
                        mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]),
                    pb.GetCapacityRequest(accessible_topology=pb.Topology(
                        segments={"cargohold.io/node": "elsewhere"}))):
        assert csi.call(get, request).available_capacity == 0
    csi.fails(Code.INVALID_ARGUMENT, get, pb.GetCapacityRequest(parameters={"color": "red"}))


# --- Node: mount access ----------------------------------------------------------------


def test_mount_stage_publish_write_and_read_back_elsewhere(csi: Csi, tmp_path: Path) -> None:
    n = csi.nodes
    cap = mount_cap()
    volume_id = csi.create("pvc-data", 256 * MIB).volume_id
    csi.call(csi.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id="node1", volume_capability=cap))
    staging, target = tmp_path / "staging", tmp_path / "pods" / "a" / "mount"
    target.parent.mkdir(parents=True)  # the CO makes the parent, the driver the target

    csi.fails(Code.FAILED_PRECONDITION, n.NodePublishVolume,  # not staged yet
              csi.publish_request(volume_id, staging, target, cap))
    csi.fails(Code.FAILED_PRECONDITION, n.NodePublishVolume,
              pb.NodePublishVolumeRequest(volume_id=volume_id, target_path=str(target),
                                          volume_capability=cap))  # no staging path
    csi.stage(volume_id, staging, cap)
    csi.stage(volume_id, staging, cap)  # idempotent
    assert _inspect(csi.node, volume_id)["state"] == "attached"
    csi.fails(Code.ALREADY_EXISTS, n.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=block_cap()))
    csi.fails(Code.FAILED_PRECONDITION, n.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging),
        volume_capability=mount_cap(fs="xfs")))
    csi.fails(Code.NOT_FOUND, n.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id="no-such-volume", staging_target_path=str(staging), volume_capability=cap))
    csi.fails(Code.INVALID_ARGUMENT, n.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=volume_id, volume_capability=cap))
    csi.fails(Code.INVALID_ARGUMENT, n.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging)))

    csi.publish(volume_id, staging, target, cap)
    csi.publish(volume_id, staging, target, cap)  # idempotent
    csi.fails(Code.ALREADY_EXISTS, n.NodePublishVolume,
              csi.publish_request(volume_id, staging, target, cap, readonly=True))
    data = os.urandom(8 * MIB)
    with open(target / "data.bin", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    (target / "dir").mkdir()

    usage = csi.stats(volume_id, target)
    assert set(usage) == {"BYTES", "INODES"}
    assert 200 * MIB < usage["BYTES"].total <= 256 * MIB
    assert usage["BYTES"].used >= 8 * MIB
    assert usage["BYTES"].available + usage["BYTES"].used <= usage["BYTES"].total
    assert usage["INODES"].total > usage["INODES"].used >= 2  # at least data.bin and dir
    assert csi.stats(volume_id, staging)["BYTES"].total == usage["BYTES"].total
    csi.fails(Code.NOT_FOUND, n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
        volume_id=volume_id, volume_path=str(tmp_path / "nowhere")))
    csi.fails(Code.NOT_FOUND, n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
        volume_id="no-such-volume", volume_path=str(target)))
    csi.fails(Code.INVALID_ARGUMENT, n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
        volume_id=volume_id))

    # a staged volume cannot be deleted; a published one cannot be unstaged
    csi.fails(Code.FAILED_PRECONDITION, csi.controller.DeleteVolume,
              pb.DeleteVolumeRequest(volume_id=volume_id))
    csi.fails(Code.FAILED_PRECONDITION, n.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging)))

    csi.unpublish(volume_id, target)
    csi.unpublish(volume_id, target)  # idempotent
    assert not target.exists()  # the driver removes what it made
    csi.unstage(volume_id, staging)
    csi.unstage(volume_id, staging)  # idempotent
    assert _inspect(csi.node, volume_id)["state"] == "detached"
    assert _mounts_under(tmp_path) == [] and leftovers(tmp_path)["loops"] == []
    csi.fails(Code.NOT_FOUND, n.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(
        volume_id="no-such-volume", staging_target_path=str(staging)))
    csi.fails(Code.NOT_FOUND, n.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(
        volume_id="no-such-volume", target_path=str(target)))
    csi.fails(Code.INVALID_ARGUMENT, n.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(
        volume_id=volume_id))

    # staged and published again elsewhere: the data is there
    staging2, target2 = tmp_path / "staging2", tmp_path / "pods" / "b" / "mount"
    target2.parent.mkdir(parents=True)
    csi.stage(volume_id, staging2, cap)
    csi.publish(volume_id, staging2, target2, cap)
    assert (target2 / "data.bin").read_bytes() == data and (target2 / "dir").is_dir()

    # read-only publish beside it: reads work, writes are refused
    readonly = tmp_path / "pods" / "c" / "mount"
    readonly.parent.mkdir(parents=True)
    csi.publish(volume_id, staging2, readonly, cap, readonly=True)
    csi.publish(volume_id, staging2, readonly, cap, readonly=True)  # idempotent
    assert hashlib.sha256((readonly / "data.bin").read_bytes()).digest() == \
        hashlib.sha256(data).digest()
    with pytest.raises(OSError) as refused:
        (readonly / "new").write_text("no")
    assert refused.value.errno == errno.EROFS
    (target2 / "still-writable").write_text("yes")

    for path in (target2, readonly):
        csi.unpublish(volume_id, path)
    csi.unstage(volume_id, staging2)
    csi.call(csi.controller.ControllerUnpublishVolume, pb.ControllerUnpublishVolumeRequest(
        volume_id=volume_id, node_id="node1"))
    csi.call(csi.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=volume_id))
    csi.node.stop()
    assert leftovers(tmp_path) == {"mounts": [], "loops": [], "processes": []}


# --- Node: raw block access ------------------------------------------------------------


def _blkid(device: str) -> str:
    done = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip()


def test_node_paths_outside_the_kubelet_directory_are_refused(csi: Csi, tmp_path: Path
                                                              ) -> None:
    """A request may not make the driver mount over /etc, not even through a symbolic
    link inside the kubelet directory (here the node's base, --csi-kubelet-dir)."""
    n = csi.nodes
    cap = mount_cap()
    volume_id = csi.create("pvc-paths").volume_id
    csi.call(csi.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id="node1", volume_capability=cap))
    outside = Path(tempfile.mkdtemp(prefix="cargohold-outside-"))
    link = tmp_path / "pods" / "escape"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    try:
        for staging in (outside, link, tmp_path / "pods" / ".." / ".." / outside.name):
            detail = csi.fails(Code.INVALID_ARGUMENT, n.NodeStageVolume,
                               pb.NodeStageVolumeRequest(volume_id=volume_id,
                                                         staging_target_path=str(staging),
                                                         volume_capability=cap))
            assert "kubelet directory" in detail
        staging = tmp_path / "staging"
        csi.stage(volume_id, staging, cap)
        for target in (outside / "mount", link / "mount"):
            csi.fails(Code.INVALID_ARGUMENT, n.NodePublishVolume,
                      csi.publish_request(volume_id, staging, target, cap))
        csi.fails(Code.INVALID_ARGUMENT, n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=str(outside)))
        assert list(outside.iterdir()) == []  # nothing made or mounted out there
        assert _mounts_under(outside) == []
        csi.unstage(volume_id, staging)
        audit = [json.loads(line) for line in
                 (csi.node.state / "audit.log").read_text().splitlines()]
        csi_lines = [(r["who"], r["path"], r["result"]) for r in audit if r["who"] == "csi"]
        assert csi_lines == [("csi", "CreateVolume", "OK"),
                             ("csi", "ControllerPublishVolume", "OK"),
                             *[("csi", "NodeStageVolume", "INVALID_ARGUMENT")] * 3,
                             ("csi", "NodeStageVolume", "OK"),
                             *[("csi", "NodePublishVolume", "INVALID_ARGUMENT")] * 2,
                             ("csi", "NodeUnstageVolume", "OK")]
    finally:
        link.unlink()
        if _mounts_under(outside):  # only if the driver let a request through
            subprocess.run(["umount", "--lazy", str(outside)], check=False)
        outside.rmdir()


def test_block_stage_publish_write_and_read_back(csi: Csi, tmp_path: Path) -> None:
    cap = block_cap()
    volume_id = csi.create("pvc-raw", 64 * MIB, caps=(cap,)).volume_id
    staging = tmp_path / "staging"
    csi.stage(volume_id, staging, cap)
    csi.stage(volume_id, staging, cap)  # idempotent
    inspected = _inspect(csi.node, volume_id)
    device = inspected["attachment"]["device"]
    assert inspected["state"] == "attached" and inspected["attachment"]["mountpoint"] == ""
    assert not inspected["formatted"] and _blkid(device) == ""  # never formatted
    assert _mounts_under(tmp_path) == [  # only the engine's FUSE file: no file system
        str(tmp_path / "state" / "engines" / volume_id / "fuse")]
    csi.fails(Code.ALREADY_EXISTS, csi.nodes.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=mount_cap()))

    target = tmp_path / "pods" / "a" / "dev"
    target.parent.mkdir(parents=True)
    csi.publish(volume_id, staging, target, cap)
    csi.publish(volume_id, staging, target, cap)  # idempotent
    assert stat.S_ISBLK(target.stat().st_mode)
    data = os.urandom(4 * MIB)
    with open(target, "r+b", buffering=0) as f:
        f.seek(8 * MIB)
        f.write(data)
        os.fsync(f.fileno())
    assert csi.stats(volume_id, target) == {"BYTES": pb.VolumeUsage(
        unit=pb.VolumeUsage.BYTES, total=64 * MIB)}

    readonly = tmp_path / "pods" / "b" / "dev"
    readonly.parent.mkdir(parents=True)
    csi.publish(volume_id, staging, readonly, cap, readonly=True)
    with open(readonly, "rb") as f:
        f.seek(8 * MIB)
        assert f.read(len(data)) == data
    with pytest.raises(OSError):
        with open(readonly, "r+b", buffering=0) as f:
            f.write(b"x" * 4096)
            os.fsync(f.fileno())

    for path in (target, readonly):
        csi.unpublish(volume_id, path)
        assert not path.exists()
    csi.unstage(volume_id, staging)
    assert _inspect(csi.node, volume_id)["state"] == "detached"
    assert leftovers(tmp_path)["loops"] == [] and _mounts_under(tmp_path) == []

    # staged again: the bytes are still there, and it still holds no file system
    csi.stage(volume_id, tmp_path / "staging2", cap)
    target2 = tmp_path / "pods" / "c" / "dev"
    target2.parent.mkdir(parents=True)
    csi.publish(volume_id, tmp_path / "staging2", target2, cap)
    with open(target2, "rb") as f:
        f.seek(8 * MIB)
        assert f.read(len(data)) == data
    csi.unpublish(volume_id, target2)
    csi.unstage(volume_id, tmp_path / "staging2")
    assert not _inspect(csi.node, volume_id)["formatted"]

    # created for block access only: mounting it (which would format it) is refused
    details = csi.fails(Code.FAILED_PRECONDITION, csi.nodes.NodeStageVolume,
                        pb.NodeStageVolumeRequest(volume_id=volume_id,
                                                  staging_target_path=str(staging),
                                                  volume_capability=mount_cap()))
    assert "format" in details
    csi.node.stop()
    assert leftovers(tmp_path) == {"mounts": [], "loops": [], "processes": []}


def test_node_restart_keeps_staged_and_published_volumes(csi: Csi, tmp_path: Path) -> None:
    mount, block = mount_cap(), block_cap()
    csi.create("pvc-fs", caps=(mount,))
    csi.create("pvc-dev", caps=(block,))
    (tmp_path / "pods").mkdir()
    csi.stage("pvc-fs", tmp_path / "st-fs", mount)
    csi.publish("pvc-fs", tmp_path / "st-fs", tmp_path / "pods" / "fs", mount)
    csi.stage("pvc-dev", tmp_path / "st-dev", block)
    csi.publish("pvc-dev", tmp_path / "st-dev", tmp_path / "pods" / "dev", block)
    (tmp_path / "pods" / "fs" / "f").write_text("before")

    csi.node.kill()  # the node dies; engines, mounts and loop devices stay
    csi.node.start()
    logs = csi.node.logs()
    assert "adopted pvc-fs" in logs and "adopted pvc-dev" in logs
    csi.publish("pvc-fs", tmp_path / "st-fs", tmp_path / "pods" / "fs", mount)  # still there
    csi.publish("pvc-dev", tmp_path / "st-dev", tmp_path / "pods" / "dev", block)
    assert (tmp_path / "pods" / "fs" / "f").read_text() == "before"
    assert stat.S_ISBLK((tmp_path / "pods" / "dev").stat().st_mode)

    csi.unpublish("pvc-fs", tmp_path / "pods" / "fs")
    csi.unstage("pvc-fs", tmp_path / "st-fs")
    csi.unpublish("pvc-dev", tmp_path / "pods" / "dev")
    csi.unstage("pvc-dev", tmp_path / "st-dev")
    assert [_inspect(csi.node, v)["state"] for v in ("pvc-fs", "pvc-dev")] == ["detached"] * 2
    csi.node.stop()
    assert leftovers(tmp_path) == {"mounts": [], "loops": [], "processes": []}


# --- Expansion -------------------------------------------------------------------------


def _expand(csi: Csi, volume_id: str, required: int, limit: int = 0,
            cap: pb.VolumeCapability | None = None) -> pb.ControllerExpandVolumeResponse:
    request = pb.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=required,
                                                             limit_bytes=limit))
    if cap is not None:
        request.volume_capability.CopyFrom(cap)
    return csi.call(csi.controller.ControllerExpandVolume, request)


def test_controller_expand_volume(csi: Csi) -> None:
    c = csi.controller
    volume_id = csi.create("pvc-grow", 64 * MIB).volume_id
    csi.fails(Code.INVALID_ARGUMENT, c.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
        capacity_range=pb.CapacityRange(required_bytes=128 * MIB)))
    csi.fails(Code.INVALID_ARGUMENT, c.ControllerExpandVolume,
              pb.ControllerExpandVolumeRequest(volume_id=volume_id))  # no capacity_range
    csi.fails(Code.NOT_FOUND, c.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
        volume_id="no-such-volume", capacity_range=pb.CapacityRange(required_bytes=MIB)))
    for required, limit in [(64 * MIB, 32 * MIB),  # a limit below the size: it cannot shrink
                            (200 * MIB, 100 * MIB),  # nothing in the range
                            (128 * MIB + 1, 128 * MIB + 4096),  # no whole MiB in the range
                            (65 << 40, 0)]:  # above the largest volume
        details = csi.fails(Code.OUT_OF_RANGE, c.ControllerExpandVolume,
                            pb.ControllerExpandVolumeRequest(
                                volume_id=volume_id, capacity_range=pb.CapacityRange(
                                    required_bytes=required, limit_bytes=limit)))
        assert "pvc-grow" in details
    assert _inspect(csi.node, volume_id)["size"] == 64 * MIB  # refusals changed nothing

    grown = _expand(csi, volume_id, 100 * MIB + 1)  # rounded up to whole MiB
    assert (grown.capacity_bytes, grown.node_expansion_required) == (101 * MIB, True)
    assert _expand(csi, volume_id, 101 * MIB).capacity_bytes == 101 * MIB  # idempotent
    assert _expand(csi, volume_id, 32 * MIB).capacity_bytes == 101 * MIB  # never shrinks
    assert _inspect(csi.node, volume_id)["size"] == 101 * MIB
    raw = csi.create("pvc-grow-raw", 64 * MIB, caps=(block_cap(),)).volume_id
    grown = _expand(csi, raw, 128 * MIB)
    assert (grown.capacity_bytes, grown.node_expansion_required) == (128 * MIB, False)
    grown = _expand(csi, volume_id, 128 * MIB, cap=mount_cap())
    assert (grown.capacity_bytes, grown.node_expansion_required) == (128 * MIB, True)
    listed = csi.call(c.ListVolumes, pb.ListVolumesRequest())
    assert {e.volume.volume_id: e.volume.capacity_bytes for e in listed.entries} == {
        volume_id: 128 * MIB, raw: 128 * MIB}


def test_online_expand_of_a_published_mount_volume(csi: Csi, tmp_path: Path) -> None:
    n = csi.nodes
    cap = mount_cap(fs="xfs")  # ext4 grows online only with CAP_SYS_RESOURCE
    volume_id = csi.create("pvc-xfs", 320 * MIB, caps=(cap,), fs="xfs").volume_id
    staging, target = tmp_path / "staging", tmp_path / "pods" / "a" / "mount"
    target.parent.mkdir(parents=True)
    csi.stage(volume_id, staging, cap)
    csi.publish(volume_id, staging, target, cap)
    data = os.urandom(16 * MIB)
    with open(target / "data.bin", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    before = csi.stats(volume_id, target)["BYTES"].total
    assert before <= 320 * MIB

    grown = _expand(csi, volume_id, GIB)
    assert (grown.capacity_bytes, grown.node_expansion_required) == (GIB, True)
    expand = pb.NodeExpandVolumeRequest
    csi.fails(Code.INVALID_ARGUMENT, n.NodeExpandVolume, expand(volume_id=volume_id))
    csi.fails(Code.INVALID_ARGUMENT, n.NodeExpandVolume, expand(volume_path=str(target)))
    csi.fails(Code.NOT_FOUND, n.NodeExpandVolume,
              expand(volume_id="no-such-volume", volume_path=str(target)))
    csi.fails(Code.NOT_FOUND, n.NodeExpandVolume,
              expand(volume_id=volume_id, volume_path=str(tmp_path / "nowhere")))
    csi.fails(Code.OUT_OF_RANGE, n.NodeExpandVolume, expand(  # the controller did not grow it
        volume_id=volume_id, volume_path=str(target),
        capacity_range=pb.CapacityRange(required_bytes=2 * GIB)))
    assert csi.stats(volume_id, target)["BYTES"].total == before  # the refusals did nothing

    request = expand(volume_id=volume_id, volume_path=str(target), volume_capability=cap,
                     staging_target_path=str(staging),
                     capacity_range=pb.CapacityRange(required_bytes=GIB))
    assert csi.call(n.NodeExpandVolume, request).capacity_bytes == GIB
    assert csi.call(n.NodeExpandVolume, request).capacity_bytes == GIB  # idempotent
    total = csi.stats(volume_id, target)["BYTES"].total
    assert 3 * before < total <= GIB
    assert csi.stats(volume_id, staging)["BYTES"].total == total
    assert (target / "data.bin").read_bytes() == data
    big = os.urandom(4 * MIB)
    with open(target / "big.bin", "wb") as f:  # more than the volume held before
        for _ in range(100):
            f.write(big)
        os.fsync(f.fileno())
    assert (target / "big.bin").stat().st_size == 400 * MIB

    csi.unpublish(volume_id, target)
    csi.unstage(volume_id, staging)
    csi.stage(volume_id, staging, cap)  # staged again: still 1G, data intact
    csi.publish(volume_id, staging, target, cap)
    assert csi.stats(volume_id, target)["BYTES"].total == total
    assert (target / "data.bin").read_bytes() == data
    csi.unpublish(volume_id, target)
    csi.unstage(volume_id, staging)
    csi.node.stop()
    assert leftovers(tmp_path) == {"mounts": [], "loops": [], "processes": []}


def test_online_expand_of_a_published_block_volume(csi: Csi, tmp_path: Path) -> None:
    cap = block_cap()
    volume_id = csi.create("pvc-dev-grow", 64 * MIB, caps=(cap,)).volume_id
    staging, target = tmp_path / "staging", tmp_path / "pods" / "a" / "dev"
    target.parent.mkdir(parents=True)
    csi.stage(volume_id, staging, cap)
    csi.publish(volume_id, staging, target, cap)
    data = os.urandom(MIB)
    with open(target, "r+b", buffering=0) as f:
        f.seek(63 * MIB)
        f.write(data)
        os.fsync(f.fileno())

    grown = _expand(csi, volume_id, 256 * MIB)
    assert (grown.capacity_bytes, grown.node_expansion_required) == (256 * MIB, False)
    # attached here: the loop device grew already, before any NodeExpandVolume
    assert csi.stats(volume_id, target)["BYTES"].total == 256 * MIB
    response = csi.call(csi.nodes.NodeExpandVolume, pb.NodeExpandVolumeRequest(
        volume_id=volume_id, volume_path=str(target), volume_capability=cap))
    assert response.capacity_bytes == 256 * MIB
    with open(target, "r+b", buffering=0) as f:
        f.seek(63 * MIB)
        assert f.read(MIB) == data
        f.seek(200 * MIB)  # beyond the old end
        f.write(data)
        os.fsync(f.fileno())
    csi.unpublish(volume_id, target)
    csi.unstage(volume_id, staging)
    csi.stage(volume_id, staging, cap)
    csi.publish(volume_id, staging, target, cap)
    with open(target, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_END) == 256 * MIB
        f.seek(200 * MIB)
        assert f.read(MIB) == data
    csi.unpublish(volume_id, target)
    csi.unstage(volume_id, staging)
    csi.node.stop()
    assert leftovers(tmp_path) == {"mounts": [], "loops": [], "processes": []}


def test_encrypted_volumes_take_their_key_from_a_csi_secret(csi: Csi, tmp_path: Path) -> None:
    create = csi.controller.CreateVolume
    key = os.urandom(64)
    volume = csi.call(create, pb.CreateVolumeRequest(
        name="pvc-sealed", volume_capabilities=[block_cap()],
        capacity_range=pb.CapacityRange(required_bytes=64 * MIB),
        secrets={"encryptionKey": key.hex()})).volume
    assert _inspect(csi.node, volume.volume_id)["encryption"] == "aes-256-xts-plain64/4096"
    by_parameter = csi.create("pvc-random-key", 64 * MIB, encrypt="true")
    assert _inspect(csi.node, by_parameter.volume_id)["encryption"]
    csi.fails(Code.ALREADY_EXISTS, create, pb.CreateVolumeRequest(  # not the same volume
        name="pvc-random-key", volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=64 * MIB)))
    details = csi.fails(Code.INVALID_ARGUMENT, create, pb.CreateVolumeRequest(
        name="pvc-bad-key", volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=64 * MIB),
        secrets={"encryptionKey": "00" * 64}))
    assert "volume key" in details and "00" * 8 not in details
    csi.fails(Code.INVALID_ARGUMENT, create, pb.CreateVolumeRequest(
        name="pvc-bad-flag", volume_capabilities=[mount_cap()], parameters={"encrypt": "maybe"}))
    assert {v["name"] for v in csi.node.json("volume", "ls")} == {  # type: ignore[union-attr]
        "pvc-sealed", "pvc-random-key"}

    staging, target = tmp_path / "staging", tmp_path / "pods" / "s" / "dev"
    target.parent.mkdir(parents=True)
    csi.stage(volume.volume_id, staging, block_cap())
    csi.publish(volume.volume_id, staging, target, block_cap())
    data = os.urandom(MIB)
    with open(target, "r+b", buffering=0) as f:
        f.seek(4 * MIB)
        f.write(data)
        os.fsync(f.fileno())
    with open(target, "rb") as f:
        f.seek(4 * MIB)
        assert f.read(MIB) == data
    csi.unpublish(volume.volume_id, target)
    csi.unstage(volume.volume_id, staging)
    replicas = [p for disk in csi.node.data_dirs for p in disk.rglob("*") if p.is_file()]
    assert not any(data[:4096] in p.read_bytes() for p in replicas)  # ciphertext only


# --- Snapshots, clones, group snapshots, modify ------------------------------------------


def _write_through_csi(csi: Csi, tmp_path: Path, volume_id: str, name: str,
                       data: bytes | None) -> bytes:
    """Stage and publish ``volume_id``, write ``data`` to file ``name`` (None: read it), then
    unpublish and unstage; return the file's bytes."""
    cap = mount_cap()
    staging, target = tmp_path / f"st-{volume_id}", tmp_path / "pods" / volume_id / "mount"
    target.parent.mkdir(parents=True, exist_ok=True)
    csi.stage(volume_id, staging, cap)
    csi.publish(volume_id, staging, target, cap)
    try:
        if data is not None:
            with open(target / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return (target / name).read_bytes()
    finally:
        csi.unpublish(volume_id, target)
        csi.unstage(volume_id, staging)


def test_snapshots_clones_and_groups_through_csi(csi: Csi, tmp_path: Path) -> None:
    c = csi.controller
    source = csi.create("pvc-src", 128 * MIB).volume_id
    first = _write_through_csi(csi, tmp_path, source, "f", os.urandom(4 * MIB))

    snap = csi.call(c.CreateSnapshot, pb.CreateSnapshotRequest(
        name="snapshot-1", source_volume_id=source)).snapshot
    assert (snap.snapshot_id, snap.source_volume_id, snap.ready_to_use) == (
        "pvc-src@snapshot-1", source, True)
    assert snap.size_bytes == 128 * MIB and snap.creation_time.seconds > 0
    again = csi.call(c.CreateSnapshot, pb.CreateSnapshotRequest(
        name="snapshot-1", source_volume_id=source)).snapshot
    assert again == snap  # idempotent
    other = csi.create("pvc-other", 64 * MIB).volume_id
    csi.fails(Code.ALREADY_EXISTS, c.CreateSnapshot, pb.CreateSnapshotRequest(
        name="snapshot-1", source_volume_id=other))
    csi.fails(Code.NOT_FOUND, c.CreateSnapshot, pb.CreateSnapshotRequest(
        name="snapshot-2", source_volume_id="no-such-volume"))
    csi.fails(Code.INVALID_ARGUMENT, c.CreateSnapshot, pb.CreateSnapshotRequest(
        name="snapshot-2", source_volume_id=source, parameters={"color": "red"}))
    csi.fails(Code.INVALID_ARGUMENT, c.CreateSnapshot, pb.CreateSnapshotRequest(name="x"))
    second = csi.call(c.CreateSnapshot, pb.CreateSnapshotRequest(
        name="snapshot-2", source_volume_id=source,
        parameters={"freeze": "false"})).snapshot

    listed = csi.call(c.ListSnapshots, pb.ListSnapshotsRequest())
    assert [e.snapshot.snapshot_id for e in listed.entries] == [
        "pvc-src@snapshot-1", "pvc-src@snapshot-2"]
    page = csi.call(c.ListSnapshots, pb.ListSnapshotsRequest(max_entries=1))
    assert len(page.entries) == 1 and page.next_token
    rest = csi.call(c.ListSnapshots, pb.ListSnapshotsRequest(starting_token=page.next_token))
    assert [e.snapshot.snapshot_id for e in rest.entries] == ["pvc-src@snapshot-2"]
    csi.fails(Code.ABORTED, c.ListSnapshots, pb.ListSnapshotsRequest(starting_token="bogus"))
    by_id = csi.call(c.ListSnapshots, pb.ListSnapshotsRequest(snapshot_id=second.snapshot_id))
    assert [e.snapshot for e in by_id.entries] == [second]
    assert not csi.call(c.ListSnapshots, pb.ListSnapshotsRequest(snapshot_id="nope")).entries
    assert not csi.call(c.ListSnapshots, pb.ListSnapshotsRequest(
        source_volume_id=other)).entries
    assert csi.call(c.GetSnapshot, pb.GetSnapshotRequest(
        snapshot_id=snap.snapshot_id)).snapshot == snap
    csi.fails(Code.NOT_FOUND, c.GetSnapshot, pb.GetSnapshotRequest(snapshot_id="pvc-src@no"))

    _write_through_csi(csi, tmp_path, source, "f", os.urandom(4 * MIB))  # the source moves on
    from_snapshot = pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
    restored = csi.call(c.CreateVolume, pb.CreateVolumeRequest(
        name="pvc-restored", volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=256 * MIB),  # larger: grown
        volume_content_source=from_snapshot)).volume
    assert restored.content_source == from_snapshot and restored.capacity_bytes == 256 * MIB
    assert _write_through_csi(csi, tmp_path, restored.volume_id, "f", None) == first
    csi.fails(Code.OUT_OF_RANGE, c.CreateVolume, pb.CreateVolumeRequest(
        name="pvc-small", volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(limit_bytes=64 * MIB),
        volume_content_source=from_snapshot))
    from_volume = pb.VolumeContentSource(
        volume=pb.VolumeContentSource.VolumeSource(volume_id=source))
    cloned = csi.call(c.CreateVolume, pb.CreateVolumeRequest(
        name="pvc-clone", volume_capabilities=[mount_cap()],
        volume_content_source=from_volume)).volume
    assert cloned.content_source == from_volume and cloned.capacity_bytes == 128 * MIB
    assert _write_through_csi(csi, tmp_path, cloned.volume_id, "f", None) != first

    # a volume with snapshots is not deleted (the spec's FAILED_PRECONDITION)
    csi.fails(Code.FAILED_PRECONDITION, c.DeleteVolume, pb.DeleteVolumeRequest(volume_id=source))

    group_stub = stubs.GroupControllerStub(csi.channel)
    group = csi.call(group_stub.CreateVolumeGroupSnapshot, pb.CreateVolumeGroupSnapshotRequest(
        name="groupsnapshot-1", source_volume_ids=[source, other])).group_snapshot
    assert group.group_snapshot_id == "groupsnapshot-1" and group.ready_to_use
    assert sorted(s.snapshot_id for s in group.snapshots) == [
        "pvc-other@groupsnapshot-1", "pvc-src@groupsnapshot-1"]
    assert all(s.group_snapshot_id == "groupsnapshot-1" for s in group.snapshots)
    same = csi.call(group_stub.CreateVolumeGroupSnapshot, pb.CreateVolumeGroupSnapshotRequest(
        name="groupsnapshot-1", source_volume_ids=[other, source])).group_snapshot
    assert sorted(s.snapshot_id for s in same.snapshots) == sorted(
        s.snapshot_id for s in group.snapshots)
    csi.fails(Code.ALREADY_EXISTS, group_stub.CreateVolumeGroupSnapshot,
              pb.CreateVolumeGroupSnapshotRequest(name="groupsnapshot-1",
                                                  source_volume_ids=[source]))
    fetched = csi.call(group_stub.GetVolumeGroupSnapshot, pb.GetVolumeGroupSnapshotRequest(
        group_snapshot_id="groupsnapshot-1")).group_snapshot
    assert fetched.group_snapshot_id == "groupsnapshot-1" and len(fetched.snapshots) == 2
    csi.fails(Code.FAILED_PRECONDITION, c.DeleteSnapshot, pb.DeleteSnapshotRequest(
        snapshot_id="pvc-src@groupsnapshot-1"))  # a member goes with its group
    csi.call(group_stub.DeleteVolumeGroupSnapshot, pb.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id="groupsnapshot-1"))
    csi.call(group_stub.DeleteVolumeGroupSnapshot, pb.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id="groupsnapshot-1"))  # again: fine
    csi.fails(Code.NOT_FOUND, group_stub.GetVolumeGroupSnapshot,
              pb.GetVolumeGroupSnapshotRequest(group_snapshot_id="groupsnapshot-1"))

    # replicas changed through a VolumeAttributesClass
    csi.call(c.ControllerModifyVolume, pb.ControllerModifyVolumeRequest(
        volume_id=other, mutable_parameters={"replicas": "3"}))
    assert _inspect(csi.node, other)["replica_count"] == 3
    csi.fails(Code.INVALID_ARGUMENT, c.ControllerModifyVolume, pb.ControllerModifyVolumeRequest(
        volume_id=other, mutable_parameters={"color": "red"}))
    csi.fails(Code.NOT_FOUND, c.ControllerModifyVolume, pb.ControllerModifyVolumeRequest(
        volume_id="no-such-volume", mutable_parameters={"replicas": "3"}))

    # a snapshot is not deleted while a volume restored from it still fills from it (the
    # spec's FAILED_PRECONDITION for a snapshot in use; the snapshotter tries again)
    deadline = time.monotonic() + 120
    while any(_inspect(csi.node, v)["origin"] is not None
              for v in (restored.volume_id, cloned.volume_id)):
        try:  # (it may have filled since we looked: then the delete goes through)
            c.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id),
                             timeout=TIMEOUT)
        except grpc.RpcError as refused:
            assert refused.code() == Code.FAILED_PRECONDITION, refused.details()
        assert time.monotonic() < deadline, "the restored volume did not fill"
        time.sleep(0.2)
    for snapshot_id in (snap.snapshot_id, second.snapshot_id):
        csi.call(c.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))
        csi.call(c.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))  # again
    assert not csi.call(c.ListSnapshots, pb.ListSnapshotsRequest()).entries
    while csi.node.json("snapshot", "ls", source):  # the one taken for the clone goes last
        assert time.monotonic() < deadline, "the snapshot taken for the clone stayed"
        time.sleep(0.2)
    csi.call(c.DeleteVolume, pb.DeleteVolumeRequest(volume_id=source))
