"""The one error tree of cargohold.

Each error's docstring is its message template (``str.format`` fields are the keyword
arguments given to the constructor). ``code`` is stable and part of the API: REST bodies,
CLI output and Docker ``Err`` strings carry it. ``kind`` groups codes for the adapters,
which each map kinds to their own status space in one place (REST → HTTP status,
CLI → exit code, CSI → gRPC code, Docker → ``Err``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class Kind(StrEnum):
    INVALID = "invalid"  # the request is wrong; retrying it unchanged cannot help
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # the request clashes with the current state
    UNAVAILABLE = "unavailable"  # temporary: a peer or the metadata store is down
    NO_SPACE = "no_space"
    FENCED = "fenced"  # a newer attachment owns the volume
    INTERNAL = "internal"


class CargoholdError(Exception):
    """cargohold failed: {detail}"""

    code: ClassVar[str] = "internal"
    kind: ClassVar[Kind] = Kind.INTERNAL
    temporary: ClassVar[bool] = False

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        # the docstring's first paragraph, its lines joined
        template = " ".join((self.__doc__ or self.code).strip().split("\n\n")[0].split())
        try:
            message = template.format(**fields)
        except (KeyError, IndexError):
            message = f"{template} {fields}"
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


# --- invalid input -------------------------------------------------------------------


class InvalidArgument(CargoholdError):
    """Invalid {what}: {detail}"""

    code = "invalid_argument"
    kind = Kind.INVALID


class InvalidName(InvalidArgument):
    """Invalid name {name!r}: {detail}. Use 1-63 characters: letters, digits, '.', '_' and '-', starting with a letter or digit."""  # noqa: E501

    code = "invalid_name"


class InvalidSize(InvalidArgument):
    """Invalid size {size!r}: {detail}. Give bytes or a number with M, G or T (for example 512M, 2G, 1T)."""  # noqa: E501

    code = "invalid_size"


class InvalidReplicas(InvalidArgument):
    """Invalid replica count {replicas!r}: {detail}"""

    code = "invalid_replicas"


class InvalidFilesystem(InvalidArgument):
    """Invalid filesystem {fs!r}: {detail}"""

    code = "invalid_filesystem"


class ShrinkRefused(InvalidArgument):
    """Volume {name!r} is {current}; it cannot shrink to {size}. Volumes only grow: give a size larger than {current}."""  # noqa: E501

    code = "shrink_refused"


class InvalidOption(InvalidArgument):
    """Unknown option {option!r}. Known options: {known}."""

    code = "invalid_option"


# --- not found -----------------------------------------------------------------------


class VolumeNotFound(CargoholdError):
    """Volume {name!r} does not exist. List volumes with 'cargohold volume ls'."""

    code = "volume_not_found"
    kind = Kind.NOT_FOUND


class NodeNotFound(CargoholdError):
    """Node {name!r} is not known to the cluster."""

    code = "node_not_found"
    kind = Kind.NOT_FOUND


class ReplicaNotFound(CargoholdError):
    """Data server {server} holds no replica of volume {volume_id}."""

    code = "replica_not_found"
    kind = Kind.NOT_FOUND


class SnapshotNotFound(CargoholdError):
    """Snapshot {name!r} does not exist. List snapshots with 'cargohold snapshot ls'."""

    code = "snapshot_not_found"
    kind = Kind.NOT_FOUND


class LeaseExpired(CargoholdError):
    """Lease {lease} has expired or does not exist."""

    code = "lease_expired"
    kind = Kind.NOT_FOUND


# --- conflicts -----------------------------------------------------------------------


class VolumeExists(CargoholdError):
    """Volume {name!r} already exists. Pick another name or remove it first."""

    code = "volume_exists"
    kind = Kind.CONFLICT


class SnapshotExists(CargoholdError):
    """Snapshot {name!r} already exists. Pick another name or remove it first."""

    code = "snapshot_exists"
    kind = Kind.CONFLICT


class SnapshotInGroup(CargoholdError):
    """Snapshot {name!r} is part of group snapshot {group!r} and goes only with it
    ('cargohold snapshot rm --group {group}')."""

    code = "snapshot_in_group"
    kind = Kind.CONFLICT


class SnapshotHasClones(CargoholdError):
    """Snapshot {name!r} is the source of {clones}, still being filled from it. It can go
    once they are filled ('cargohold volume inspect CLONE' shows how far)."""

    code = "snapshot_has_clones"
    kind = Kind.CONFLICT


class CloneFilling(CargoholdError):
    """Volume {name!r} is a clone still being filled from {source} ({done} copied). Wait
    until it is ('cargohold volume inspect {name}') before {what}."""

    code = "clone_filling"
    kind = Kind.CONFLICT


class TooManySnapshots(CargoholdError):
    """Volume {name!r} keeps {count} snapshots, the most a volume may keep. Remove some
    ('cargohold snapshot rm') before taking more."""

    code = "too_many_snapshots"
    kind = Kind.CONFLICT


class VolumeHasSnapshots(CargoholdError):
    """Volume {name!r} has {count} snapshots, which live in its replicas. Remove them first
    ('cargohold snapshot ls {name}', 'cargohold snapshot rm {name}@SNAPSHOT')."""

    code = "volume_has_snapshots"
    kind = Kind.CONFLICT


class VolumeInUse(CargoholdError):
    """Volume {name!r} is attached on node {node!r}. Detach it first ('cargohold volume detach {name}')."""  # noqa: E501

    code = "volume_in_use"
    kind = Kind.CONFLICT


class NothingToSalvage(CargoholdError):
    """Volume {name!r} still has an in-sync replica (on {server}): nothing to salvage; out-of-sync copies are resynced from it."""  # noqa: E501

    code = "nothing_to_salvage"
    kind = Kind.CONFLICT


class NodeAlive(CargoholdError):
    """Node {name!r} is up (its lease is alive): stop it before removing it."""

    code = "node_alive"
    kind = Kind.CONFLICT


class NodeHoldsReplicas(CargoholdError):
    """Node {name!r} still holds {count} replica(s) ({volumes}): drain it first (cargohold node drain {name} --wait), or remove it with --force to rebuild them elsewhere from their other copies."""  # noqa: E501

    code = "node_holds_replicas"
    kind = Kind.CONFLICT


class LastCopy(CargoholdError):
    """Refused: the only in-sync copy of volume(s) {volumes} is on node {name!r}; removing it would lose their data. Bring the node back, or remove the volumes."""  # noqa: E501

    code = "last_copy"
    kind = Kind.CONFLICT


class OwnerAlive(CargoholdError):
    """Volume {name!r} is attached on node {node!r}, whose lease is alive: it is up, so --force is refused. Detach it there."""  # noqa: E501

    code = "owner_alive"
    kind = Kind.CONFLICT


class VolumeBusy(CargoholdError):
    """Volume {name!r} is {state}; try again when that operation has finished."""

    code = "volume_busy"
    kind = Kind.CONFLICT
    temporary = True


class NotEnoughDataServers(CargoholdError):
    """Cannot place {replicas} replicas: only {available} usable data servers{where}. Add data servers or ask for fewer replicas."""  # noqa: E501

    code = "not_enough_data_servers"
    kind = Kind.CONFLICT


class OverProvisioned(CargoholdError):
    """Cannot place {replicas} replicas of {size}: {available} data servers{where} have room under their over-provisioning limit ({limits}). Free space, add data servers, or raise the limit (cargohold node --overprovision)."""  # noqa: E501

    code = "over_provisioned"
    kind = Kind.NO_SPACE


class ConcurrentUpdate(CargoholdError):
    """{what} was changed by someone else at the same time; try again."""

    code = "concurrent_update"
    kind = Kind.CONFLICT
    temporary = True


# --- runtime failures ----------------------------------------------------------------


class DataServerUnavailable(CargoholdError):
    """Data server {server} at {address} is unreachable: {detail}"""

    code = "data_server_unavailable"
    kind = Kind.UNAVAILABLE
    temporary = True


class MetadataUnavailable(CargoholdError):
    """The metadata store {url} is unavailable: {detail}"""

    code = "metadata_unavailable"
    kind = Kind.UNAVAILABLE
    temporary = True


class NodeUnavailable(CargoholdError):
    """Cannot reach the cargohold node at {url}: {detail}. Is 'cargohold node' running?"""

    code = "node_unavailable"
    kind = Kind.UNAVAILABLE
    temporary = True


class NoSpace(CargoholdError):
    """Data server {server} is out of space: {detail}"""

    code = "no_space"
    kind = Kind.NO_SPACE


class Fenced(CargoholdError):
    """Fenced: volume {volume_id} is attached elsewhere (epoch {epoch} < {current})."""

    code = "fenced"
    kind = Kind.FENCED


class ChecksumMismatch(CargoholdError):
    """Checksum mismatch in volume {volume_id} at offset {offset} on data server {server}."""

    code = "checksum_mismatch"
    kind = Kind.INTERNAL


class NoReplicaLeft(CargoholdError):
    """Volume {name!r} has no in-sync replica left that answers; I/O is failing. If every copy failed in turn, `cargohold volume salvage {name}` brings back the one with the newest writes."""  # noqa: E501

    code = "no_replica_left"
    kind = Kind.UNAVAILABLE


class AttachFailed(CargoholdError):
    """Attaching volume {name!r} failed at step '{step}': {detail}. Nothing was left behind."""

    code = "attach_failed"
    kind = Kind.INTERNAL


class DetachFailed(CargoholdError):
    """Detaching volume {name!r} failed at step '{step}': {detail}"""

    code = "detach_failed"
    kind = Kind.INTERNAL


class ExpandFailed(CargoholdError):
    """Growing attached volume {name!r} failed at step '{step}': {detail}. Its data is intact and its new size is recorded; run 'cargohold volume resize {name} --size SIZE' again on node {node!r} to finish."""  # noqa: E501

    code = "expand_failed"
    kind = Kind.INTERNAL


class HostCommandFailed(CargoholdError):
    """{command}: {detail}"""

    code = "host_command_failed"
    kind = Kind.INTERNAL

    def __init__(self, argv: list[str], detail: str) -> None:
        super().__init__(command=" ".join(argv), detail=detail)
        self.argv = argv
        self.detail = detail


class DataServerStartFailed(CargoholdError):
    """The data server for {path} did not start: {detail}. Its log is {log}."""

    code = "data_server_start_failed"
    kind = Kind.INTERNAL


class CsiRefused(CargoholdError):
    """{detail}"""

    code = "csi_refused"
    kind = Kind.INVALID

    def __init__(self, status: str, detail: str) -> None:
        """``status``: the name of the gRPC status code the CSI spec asks for."""
        super().__init__(status=status, detail=detail)
        self.status = status


class Unauthorized(CargoholdError):
    """A valid bearer token is required on the TCP API."""

    code = "unauthorized"
    kind = Kind.INVALID


class Forbidden(CargoholdError):
    """Token {name!r} is read-only: {method} {path} changes the cluster. Use an admin token."""

    code = "forbidden"
    kind = Kind.INVALID


class SnapshotFailed(CargoholdError):
    """Snapshot {name!r} was not taken: {detail}. Nothing was kept; try again."""

    code = "snapshot_failed"
    kind = Kind.UNAVAILABLE


class LeaseLost(CargoholdError):
    """Node {node} lost its lease ({detail}): the volume may be attached elsewhere by now, so
    its I/O here fails. Restart the container once the host is back in the cluster."""

    code = "lease_lost"
    kind = Kind.FENCED


class NotAuthorized(CargoholdError):
    """Not authorized on the data path: {what}: {detail}. Data servers take I/O only with a
    capability of the cluster for the attachment, from the node it names."""

    code = "not_authorized"
    kind = Kind.INVALID




# --- backups ---------------------------------------------------------------------------


class BackupTargetNotSet(CargoholdError):
    """No backup target is set. Set one first ('cargohold backup target set s3://BUCKET/PREFIX --endpoint URL')."""  # noqa: E501

    code = "backup_target_not_set"
    kind = Kind.CONFLICT


class BackupTargetUnavailable(CargoholdError):
    """The backup target {target} did not answer: {detail}"""

    code = "backup_target_unavailable"
    kind = Kind.UNAVAILABLE
    temporary = True


class BackupNotAuthorized(CargoholdError):
    """The backup target {target} refused the credentials: {detail}. cargohold takes them as AWS tools do: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the node's environment, or the shared credentials file (~/.aws/credentials, AWS_PROFILE)."""  # noqa: E501

    code = "backup_not_authorized"
    kind = Kind.INVALID


class BackupBucketMissing(CargoholdError):
    """The backup target's bucket {bucket!r} does not exist at {endpoint}. Create it, or set another target."""  # noqa: E501

    code = "backup_bucket_missing"
    kind = Kind.NOT_FOUND


class BackupNotFound(CargoholdError):
    """Backup {id!r} does not exist in the backup target (or is not complete)."""

    code = "backup_not_found"
    kind = Kind.NOT_FOUND


class BackupCorrupt(CargoholdError):
    """In the backup target, {what} is damaged or missing: {detail}"""

    code = "backup_corrupt"
    kind = Kind.INTERNAL


class BackupRunning(CargoholdError):
    """A backup of volume {name!r} is running already ({id}). Wait for it ('cargohold backup ls {name}')."""  # noqa: E501

    code = "backup_running"
    kind = Kind.CONFLICT


class InvalidLocality(InvalidArgument):
    """Invalid locality {locality!r}: choose best-effort (a replica is built where the volume is attached), strict (attach only where a replica can be local) or off."""  # noqa: E501

    code = "invalid_locality"


class NotLocal(CargoholdError):
    """Volume {name!r} wants its data local (locality strict) and node {node!r} has no data server that can hold a replica of it. Attach it on a node with a data server, or set its locality to best-effort ('cargohold volume update {name} --locality best-effort')."""  # noqa: E501

    code = "not_local"
    kind = Kind.CONFLICT


class RemoteNotFound(CargoholdError):
    """Remote cluster {name!r} is not known here. List them with 'cargohold remote ls', add one with 'cargohold remote add'."""  # noqa: E501

    code = "remote_not_found"
    kind = Kind.NOT_FOUND


class RemoteExists(CargoholdError):
    """Remote cluster {name!r} is known already. Remove it first ('cargohold remote rm {name}') to change it."""  # noqa: E501

    code = "remote_exists"
    kind = Kind.CONFLICT


class RemoteUnavailable(CargoholdError):
    """Cannot reach remote cluster {name!r} at {endpoint}: {detail}"""

    code = "remote_unavailable"
    kind = Kind.UNAVAILABLE
    temporary = True


class ReplicationBaseMissing(CargoholdError):
    """Volume {name!r} here does not hold point {point!r} that the copy builds on ({detail}); the source sends the whole volume instead."""  # noqa: E501

    code = "replication_base_missing"
    kind = Kind.CONFLICT


class VolumePromoted(CargoholdError):
    """Volume {name!r} on this cluster was promoted ({detail}): it follows its source no more, and that source is fenced. To make the source follow it, replicate it back from here."""  # noqa: E501

    code = "volume_promoted"
    kind = Kind.CONFLICT


class VolumeDemoted(CargoholdError):
    """Volume {name!r} is fenced: {why}. It cannot be attached or written here. Use the promoted copy, replicate it back to follow it, or 'cargohold volume promote {name}' to make this copy writable again (the two then differ)."""  # noqa: E501

    code = "volume_demoted"
    kind = Kind.FENCED


class DockerUnavailable(CargoholdError):
    """Cannot use dockerd at {url}: {detail}"""

    code = "docker_unavailable"
    kind = Kind.UNAVAILABLE


_BY_CODE: dict[str, type[CargoholdError]] = {}


def _register(cls: type[CargoholdError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(CargoholdError)


def from_dict(body: dict[str, Any]) -> CargoholdError:
    """Rebuild an error received over an API, keeping its code and message."""
    cls = _BY_CODE.get(str(body.get("code")), CargoholdError)
    err = cls.__new__(cls)
    Exception.__init__(err, str(body.get("message", "")))
    err.fields = {}
    return err
