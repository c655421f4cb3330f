"""What every CSI call shares: the driver's constants, the checks of its requests, the
per-volume locks, and the one place where errors become gRPC status codes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from cargohold.adapters.csi import csi_pb2 as pb
from cargohold.clients import kernel
from cargohold.core.models import Volume
from cargohold.core.names import check_name
from cargohold.core.sizes import GIB, MAX_VOLUME_SIZE, MIB, MIN_VOLUME_SIZE, format_size
from cargohold.errors import (
    CargoholdError,
    CsiRefused,
    InvalidArgument,
    InvalidName,
    InvalidOption,
    InvalidReplicas,
    Kind,
)
from cargohold.stores.auditlog import AuditLog

log = logging.getLogger(__name__)

DRIVER_NAME = "cargohold.io"
TOPOLOGY_KEY = "cargohold.io/node"
MAX_VOLUMES_PER_NODE = 64  # attached volumes: one engine process and one loop device each
DEFAULT_SIZE = GIB
PARAMETERS = {"replicas": "2", "fs": "ext4", "encrypt": "false", "locality": "best-effort"}
#: The CSI secret (provisioner secret) that holds an encrypted volume's own key, as hex.
KEY_SECRET = "encryptionKey"
KUBERNETES_PARAMETERS = "csi.storage.k8s.io/"  # added by the external-provisioner; ignored
Mode = pb.VolumeCapability.AccessMode
MODES = (Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY)  # one host at a time
BIND_FLAGS = frozenset({"ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
                        "noatime", "atime", "nodiratime", "diratime", "relatime",
                        "norelatime", "strictatime"})  # per-mount flags a bind mount takes
TOKEN_PREFIX = "cargohold-after:"
Code = grpc.StatusCode

# --- errors: the one place where they become gRPC status codes ---------------------------


def refused(code: grpc.StatusCode, message: str) -> CsiRefused:
    """A CSI outcome that no other cargohold error describes; the spec names its code."""
    return CsiRefused(status=code.name, detail=message)


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
    if isinstance(error, CsiRefused):
        return Code[error.status], error.message
    if isinstance(error, CargoholdError):
        code = GRPC_CODES_BY_ERROR.get(error.code, GRPC_CODES[error.kind])
        return code, f"{error.message} [{error.code}]"
    return Code.INTERNAL, str(error)  # a host command failed (mount, losetup), or an OSError


Handler = Callable[[Any, Any], Awaitable[Any]]


#: Calls that change something: each is written to the audit log (``self.audit`` of the
#: service, when it has one).
CHANGES = frozenset({"CreateVolume", "DeleteVolume", "ControllerPublishVolume",
                     "ControllerUnpublishVolume", "ControllerExpandVolume", "NodeStageVolume",
                     "NodeUnstageVolume", "NodePublishVolume", "NodeUnpublishVolume",
                     "NodeExpandVolume", "ControllerModifyVolume", "CreateSnapshot",
                     "DeleteSnapshot", "CreateVolumeGroupSnapshot",
                     "DeleteVolumeGroupSnapshot"})


def rpc(method: Handler) -> Callable[[Any, Any, Any], Awaitable[Any]]:
    name = method.__name__
    audited = name in CHANGES

    @functools.wraps(method)
    async def serve(self: Any, request: Any, context: Any) -> Any:
        try:
            response = await method(self, request)
        except (CargoholdError, OSError) as e:
            code, message = grpc_status(e)
        else:
            if audited:
                _audit(self, name, request, Code.OK)
            return response
        level = logging.ERROR if code in (Code.INTERNAL, Code.UNKNOWN) else logging.INFO
        log.log(level, "CSI %s: %s: %s", name, code.name, message)
        if audited:
            _audit(self, name, request, code)
        await context.abort(code, message)

    return serve


def _audit(service: Any, name: str, request: Any, code: grpc.StatusCode) -> None:
    audit: AuditLog | None = getattr(service, "audit", None)
    if audit is not None:
        volume = getattr(request, "volume_id", "") or getattr(request, "name", "")
        audit.record("csi", "unix", "gRPC", name, code.value[0], result=code.name,
                     volume=volume)


def unimplemented(what: str) -> Callable[[Any, Any, Any], Awaitable[Any]]:
    async def serve(self: Any, request: Any, context: Any) -> Any:
        await context.abort(Code.UNIMPLEMENTED, f"cargohold has no {what} yet")

    return serve


def required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(what="request", detail=f"{field} is missing")
    return value


def required_capability(cap: pb.VolumeCapability, present: bool) -> pb.VolumeCapability:
    if not present or cap.WhichOneof("access_type") is None:
        raise InvalidArgument(what="volume_capability", detail="it needs block or mount access")
    if cap.access_mode.mode == Mode.UNKNOWN:
        raise InvalidArgument(what="volume_capability", detail="access_mode is missing")
    return cap


def access_type(cap: pb.VolumeCapability) -> str:
    return "block" if cap.WhichOneof("access_type") == "block" else "mount"


def capability_problem(cap: pb.VolumeCapability, fs: str = "") -> str:
    """Why cargohold cannot serve ``cap`` (for a volume holding ``fs``); "" if it can."""
    if cap.access_mode.mode not in MODES:
        return (f"access mode {Mode.Mode.Name(cap.access_mode.mode)} is not supported: a volume is "
                f"attached on one node at a time (SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY)")
    if access_type(cap) == "block":
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
        raise refused(Code.OUT_OF_RANGE, f"no {fs} volume fits capacity_range [{required}, "
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
        raise refused(Code.OUT_OF_RANGE, f"volume {volume.name!r} is "
                       f"{format_size(volume.size)} ({volume.size} bytes), above limit_bytes "
                       f"{limit}: volumes only grow")
    size = max(-(-required // MIB) * MIB, volume.size)
    ceiling = min(limit // MIB * MIB, MAX_VOLUME_SIZE) if limit else MAX_VOLUME_SIZE
    if size > ceiling:
        raise refused(Code.OUT_OF_RANGE, f"volume {volume.name!r} cannot grow to capacity_range "
                       f"[{required}, {limit or 'no limit'}]: cargohold volumes are whole MiB "
                       f"up to {format_size(MAX_VOLUME_SIZE)}")
    return size


def fits(size: int, capacity: pb.CapacityRange) -> bool:
    return capacity.required_bytes <= size and (not capacity.limit_bytes
                                                or size <= capacity.limit_bytes)


def parameters(given: Mapping[str, str]) -> dict[str, str]:
    chosen = {}
    for key, value in given.items():
        if key.startswith(KUBERNETES_PARAMETERS):
            continue
        if key not in PARAMETERS:
            raise InvalidOption(option=key, known=", ".join(sorted(PARAMETERS)))
        chosen[key] = value
    return chosen


def mutable(given: Mapping[str, str]) -> dict[str, str]:
    """Mutable parameters (a VolumeAttributesClass): ``replicas`` only."""
    unknown = sorted(set(given) - {"replicas"})
    if unknown:
        raise InvalidOption(option=", ".join(unknown), known="replicas")
    return dict(given)


def flag(name: str, value: str) -> bool:
    truth = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if value.lower() not in truth:
        raise InvalidArgument(what=name, detail=f"{value!r}: true or false")
    return truth[value.lower()]


def replica_count(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidReplicas(replicas=value, detail="not a whole number") from None


def page_token(name: str) -> str:
    return base64.urlsafe_b64encode(f"{TOKEN_PREFIX}{name}".encode()).decode()


def token_after(token: str) -> str:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, ValueError):
        text = ""
    if not text.startswith(TOKEN_PREFIX):
        raise refused(Code.ABORTED, f"starting_token {token!r} is not one ListVolumes gave; "
                       f"start again without it")
    return text[len(TOKEN_PREFIX):]


class Locks:
    """One asyncio lock per volume: calls on one volume run one at a time."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


def topology(node: str) -> pb.Topology:
    return pb.Topology(segments={TOPOLOGY_KEY: node})


