"""Serving the CSI driver on the node's unix socket."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from cargohold.adapters.csi import csi_pb2_grpc as pb_grpc
from cargohold.adapters.csi.controller import CsiController
from cargohold.adapters.csi.identity import CsiIdentity
from cargohold.adapters.csi.node import CsiNode
from cargohold.adapters.csi.rpc import Locks
from cargohold.adapters.csi.snapshots import CsiGroupController
from cargohold.clients.sockets import created_with_mode
from cargohold.errors import (
    CargoholdError,
)
from cargohold.services.agent import Agent
from cargohold.services.clones import CloneService
from cargohold.services.snapshots import SnapshotService
from cargohold.services.volumes import VolumeService
from cargohold.stores.auditlog import AuditLog
from cargohold.stores.catalog import Catalog


async def serve(path: str, catalog: Catalog, volumes: VolumeService, agent: Agent,
                ready: Callable[[], bool], kubelet_dir: Path, snapshots: SnapshotService,
                clones: CloneService, audit: AuditLog | None = None) -> Any:
    """Serve the driver on the unix socket ``path``; return the started ``grpc.aio`` server.
    The node service stages and publishes only under ``kubelet_dir``; every change is
    written to ``audit``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket of a crashed node
    server = grpc.aio.server()
    locks = Locks()
    pb_grpc.add_IdentityServicer_to_server(CsiIdentity(catalog, ready), server)
    controller = CsiController(catalog, volumes, agent, locks, snapshots, clones, audit)
    pb_grpc.add_ControllerServicer_to_server(controller, server)
    pb_grpc.add_GroupControllerServicer_to_server(
        CsiGroupController(catalog, snapshots, audit), server)
    pb_grpc.add_NodeServicer_to_server(CsiNode(catalog, agent, locks, kubelet_dir, audit), server)
    with created_with_mode(0o660):  # gRPC binds the socket itself: no window after it
        try:
            bound = server.add_insecure_port(f"unix://{path}")
        except RuntimeError as e:  # newer grpcio raises instead of returning 0
            raise CargoholdError(detail=f"cannot serve CSI on unix://{path}: {e}") from e
        if not bound:
            raise CargoholdError(detail=f"cannot serve CSI on unix://{path}")
        await server.start()
    return server
