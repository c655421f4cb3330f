"""The CSI Identity service: who the driver is, what it can do, whether it is ready."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import wrappers_pb2

from cargohold import __version__
from cargohold.adapters.csi import csi_pb2 as pb
from cargohold.adapters.csi import csi_pb2_grpc as pb_grpc
from cargohold.adapters.csi.rpc import (
    DRIVER_NAME,
    Code,
    refused,
    rpc,
)
from cargohold.errors import (
    CargoholdError,
)
from cargohold.stores.catalog import Catalog


class CsiIdentity(pb_grpc.IdentityServicer):
    def __init__(self, catalog: Catalog, ready: Callable[[], bool]) -> None:
        self.catalog = catalog
        self.ready = ready

    @rpc
    async def GetPluginInfo(self, request: pb.GetPluginInfoRequest) -> Any:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    @rpc
    async def GetPluginCapabilities(self, request: pb.GetPluginCapabilitiesRequest) -> Any:
        service = pb.PluginCapability.Service
        expansion = pb.PluginCapability.VolumeExpansion
        return pb.GetPluginCapabilitiesResponse(capabilities=[
            *(pb.PluginCapability(service=service(type=kind))
              for kind in (service.CONTROLLER_SERVICE, service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
                           service.GROUP_CONTROLLER_SERVICE)),
            pb.PluginCapability(volume_expansion=expansion(type=expansion.ONLINE))])

    @rpc
    async def Probe(self, request: pb.ProbeRequest) -> Any:
        try:
            await self.catalog.nodes()  # the metadata store answers
        except CargoholdError as e:
            raise refused(Code.FAILED_PRECONDITION, f"not healthy: {e.message}") from e
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self.ready()))


