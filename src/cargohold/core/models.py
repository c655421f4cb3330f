"""The cluster's records as they are kept in the metadata store (pure data, no I/O)."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def dump(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def load(cls, raw: bytes) -> Record:
        return cls.model_validate_json(raw)


class ReplicaState(StrEnum):
    IN_SYNC = "in_sync"
    OUT_OF_SYNC = "out_of_sync"  # missed acknowledged writes: never read until repaired
    RESYNCING = "resyncing"  # being brought up to date: still never read


class Replica(Record):
    server: str  # data server id
    state: ReplicaState = ReplicaState.IN_SYNC
    since: float = Field(default_factory=time.time)
    reason: str = ""
    progress: float = 0.0  # fraction done while resyncing
    replaces: str = ""  # a rebuild: the data server whose replica this one replaces


class Locality(StrEnum):
    """Where an attached volume's data should be: see services/controller/locality.py."""

    BEST_EFFORT = "best-effort"  # a replica is built on the attaching node (one remote goes)
    STRICT = "strict"  # as best-effort, and no attach where no replica can be local
    OFF = "off"  # replicas stay where placement put them


class VolumeState(StrEnum):
    CREATING = "creating"
    DETACHED = "detached"
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"
    DELETING = "deleting"


class Attachment(Record):
    node: str
    epoch: int  # fencing token: data servers refuse I/O with an older one
    mountpoint: str = ""
    device: str = ""
    engine_pid: int = 0
    since: float = Field(default_factory=time.time)


class Origin(Record):
    """What a clone reads from until its replicas hold all of it: the source snapshot.

    While a volume has one, its engine reads the chunks its replicas lack from a replica
    that keeps the snapshot, and copies one in before the first write to it; the
    controller fills the rest in the background and then drops the origin. The snapshot
    cannot be removed meanwhile."""

    volume: str  # the source volume's name
    volume_id: str
    snapshot: str  # the snapshot's name
    snapshot_id: str
    size: int  # the snapshot's size: chunks beyond it have nothing to fill
    temporary: bool = False  # taken for this clone (of a volume's contents): removed after

    @property
    def ref(self) -> str:
        return f"{self.volume}@{self.snapshot}"


class BackupState(StrEnum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


class LastBackup(Record):
    """What ``volume inspect`` shows of a volume's newest backup (or restore into it)."""

    id: str
    state: BackupState
    started: float
    finished: float = 0.0
    snapshot: str = ""
    bytes: int = 0  # data in the volume's blocks that hold any
    new_bytes: int = 0  # of which were uploaded (the rest: already in the target)
    error: str = ""


class BackupBase(Record):
    """The snapshot the next backup of a volume is taken against (what changed since)."""

    backup: str  # the backup taken from it
    snapshot: str  # its name
    snapshot_id: str
    own: bool  # taken for that backup: removed once a newer backup is complete


class Replication(Record):
    """A volume's asynchronous copy to another cluster (on the source's record)."""

    remote: str  # the remote cluster's name here (``remote add``)
    every: float  # seconds between rounds
    point: str = ""  # the last point the remote holds whole (snapshot ``repl-POINT`` here)
    point_created: float = 0.0  # when that point was cut: the remote's copy is this old
    last_started: float = 0.0  # when the last round started (survives failover)
    last_finished: float = 0.0
    last_bytes: int = 0  # sent by the last complete round
    last_error: str = ""  # why the last round failed ("" after a good one)
    last_failed: float = 0.0  # when a round last failed
    sending: str = ""  # the point a round is sending now
    progress: float = 0.0  # the fraction of its chunks sent


class MigrationState(StrEnum):
    COPYING = "copying"  # rounds of changed chunks while the volume is in use
    READY = "ready"  # copies go on; the handover waits to be told to go (``hold``)
    HANDOVER = "handover"  # writes held, the last changes going over
    DONE = "done"  # the remote volume is the primary; this one is fenced
    FAILED = "failed"


class Migration(Record):
    """A volume's live move to another cluster (on the source's record)."""

    remote: str
    node: str  # the node that runs it
    state: MigrationState = MigrationState.COPYING
    started: float = Field(default_factory=time.time)
    finished: float = 0.0
    rounds: list[dict[str, float]] = []  # per round: bytes sent, seconds
    held: float = 0.0  # seconds writers waited at the handover (the pause they saw)
    error: str = ""
    hold: bool = False  # wait in READY until ``go`` (a companion first pauses the consumer)
    go: bool = False


class ReplicaOf(Record):
    """A standby fed by another cluster's replication (on the standby's record)."""

    cluster: str  # the source cluster's id
    volume: str  # the source volume's name there
    volume_id: str
    point: str = ""  # the last point held whole (snapshot ``repl-POINT`` here; "": none yet)
    point_created: float = 0.0  # when the source cut it
    receiving: str = ""  # a point being received: the volume is between points until commit
    received: float = 0.0  # when the last point was committed here
    cutting: str = ""  # the point whose snapshot is being cut (after the commit's answer)


class PromotedFrom(Record):
    """A volume that was a standby and was promoted: the source it followed is fenced out."""

    cluster: str
    volume: str
    volume_id: str
    point: str  # the point it held when promoted (kept as snapshot ``repl-POINT``)
    at: float = Field(default_factory=time.time)


class Volume(Record):
    id: str
    name: str
    size: int
    replica_count: int
    fs: str
    formatted: bool = False
    state: VolumeState = VolumeState.CREATING
    replicas: list[Replica] = []
    attachment: Attachment | None = None
    epoch: int = 0  # the last epoch issued for this volume
    scrubbed: float = 0.0  # when the last scrub finished (0: never)
    scrub_requested: float = 0.0  # a scrub of the attached volume is asked of its engine
    last_scrub: dict[str, Any] | None = None  # the last scrub's report
    created: float = Field(default_factory=time.time)
    last_error: str = ""
    # encrypted at rest: {"cipher": core.cipher.CIPHER, "key": the volume key wrapped under
    # the cluster key}; None: stored as written
    encryption: dict[str, str] | None = None
    source: str = ""  # a clone: the snapshot (VOLUME@SNAPSHOT) it was made from
    filled: float = 0.0  # a clone: the fraction of its source copied so far
    origin: Origin | None = None  # a clone still filling: where its missing chunks are
    locality: Locality = Locality.BEST_EFFORT
    restoring: str = ""  # the backup being restored into it: not attachable meanwhile
    standby: str = ""  # a standby: the volume whose backups it follows (``restoring``: the
    # newest applied); not attachable until activated
    last_backup: LastBackup | None = None
    backup_base: BackupBase | None = None
    replication: Replication | None = None  # copied to another cluster
    replica_of: ReplicaOf | None = None  # a standby of another cluster's volume
    promoted_from: PromotedFrom | None = None  # was such a standby, promoted
    migration: Migration | None = None  # the last live move to another cluster
    fenced_by: str = ""  # its copy elsewhere was promoted: no attach, no writes (why)

    def in_sync(self) -> list[Replica]:
        return [r for r in self.replicas if r.state is ReplicaState.IN_SYNC]


class SnapshotState(StrEnum):
    CUTTING = "cutting"  # asked of the volume's engine, not cut yet: nothing to use
    READY = "ready"
    FAILED = "failed"  # the cut failed (``error``): the asker removes the record
    DELETING = "deleting"  # its replicas' copies are being forgotten


class Snapshot(Record):
    """A point-in-time copy of a volume, kept by the volume's replicas (no data here)."""

    id: str  # 32 hex characters: the id the replicas know it by
    name: str  # unique among the volume's snapshots
    volume: str  # the volume's name
    volume_id: str
    size: int  # the volume's size at the cut
    created: float = Field(default_factory=time.time)
    state: SnapshotState = SnapshotState.CUTTING
    servers: list[str] = []  # the data servers whose replicas keep it
    group: str = ""  # the group snapshot it was cut with, if any
    group_size: int = 0  # how many volumes that group snapshot cuts at once
    phase: str = ""  # "held": its engine holds the volume's writes for the group's cut
    freeze: bool = True  # freeze the mounted file system around the cut
    node: str = ""  # cutting an attached volume: the node whose engine cuts it,
    epoch: int = 0  # at the attachment of this epoch
    held: float = 0.0  # seconds writes waited for the cut
    error: str = ""  # why the cut failed
    handover: bool = False  # a migration's last point: the engine keeps writes held after the
    # cut (phase "handover") until the volume is fenced (handed over) or phase "release"
    for_clone: str = ""  # taken to clone a volume's contents into this one: goes once filled

    @property
    def ref(self) -> str:
        return f"{self.volume}@{self.name}"


class BackupTarget(Record):
    """Where backups go: one S3 bucket and prefix for the whole cluster."""

    url: str  # s3://BUCKET/PREFIX
    endpoint: str = ""  # an S3-compatible server's URL ("": AWS)
    region: str = ""
    key: str = ""  # the encryption key file's secret, wrapped under the cluster key
    set_at: float = Field(default_factory=time.time)


class BackupJob(Record):
    """A backup, restore or verify being run (by ``node``), and how it ended."""

    id: str
    kind: str  # "backup", "restore" or "verify"
    volume: str  # backed up, or restored into (a verify: the backup's volume)
    backup: str = ""  # a restore's or a verify's backup
    snapshot: str = ""  # a backup's snapshot
    node: str = ""
    state: BackupState = BackupState.RUNNING
    progress: float = 0.0
    started: float = Field(default_factory=time.time)
    finished: float = 0.0
    bytes: int = 0
    new_bytes: int = 0
    stored: int = 0  # bytes sent to the target (compressed, sealed)
    error: str = ""
    blocks: int = 0  # a verify's: distinct blocks checked
    bad: dict[str, str] = Field(default_factory=dict)  # a verify's: bad blocks, and why


class BackupSchedule(Record):
    """Back ``volume`` up every ``every`` seconds, keeping its ``keep`` newest backups."""

    volume: str
    every: float
    keep: int = 0  # 0: keep every backup
    last_started: float = 0.0  # when the controller last started one (survives failover)
    last_job: str = ""
    retained: bool = True  # retention was applied after ``last_job`` ended


BACKUP_TARGET_KEY = "backup/target"
REMOTE_PREFIX = "remotes/"
CLUSTER_ID_KEY = "cluster/id"
BACKUP_SCHEDULE_PREFIX = "backup/schedules/"
BACKUP_JOB_PREFIX = "backup/jobs/"


def backup_job_key(job_id: str) -> str:
    return f"{BACKUP_JOB_PREFIX}{job_id}"


def backup_running_key(volume: str) -> str:
    """Present while a backup of ``volume`` runs (value: its job id)."""
    return f"backup/running/{volume}"


class Remote(Record):
    """Another cluster this one replicates or migrates volumes to."""

    name: str
    endpoint: str  # https://HOST:PORT of one of its nodes' API
    token: str  # its API token, wrapped under this cluster's key (plain without one)
    ca: str = ""  # PEM of the CA its API certificate is checked with ("": the system's)
    cluster: str = ""  # its cluster id, learned when added
    added: float = Field(default_factory=time.time)


def remote_key(name: str) -> str:
    return f"{REMOTE_PREFIX}{name}"


class ServerState(StrEnum):
    UP = "up"
    DOWN = "down"


class DataServer(Record):
    id: str
    node: str
    address: str  # host:port of the data protocol
    path: str
    capacity: int = 0  # bytes of the filesystem holding ``path``
    free: int = 0  # bytes still free there
    used: int = 0  # bytes taken by replicas (thin: written blocks only)
    provisioned: int = 0  # sum of the sizes of the replicas it holds
    max_provisioned: int = 0  # over-provisioning limit for ``provisioned`` (0: none)
    reserve: int = 0  # free bytes it keeps for chunks in use: no new replicas below it
    state: ServerState = ServerState.UP
    last_seen: float = Field(default_factory=time.time)
    # since the data server process started (counters for /metrics):
    io_errors: int = 0  # requests that failed with an I/O error
    checksum_errors: int = 0  # blocks whose checksum failed when read
    checksum_repaired: int = 0  # of those, written anew from a good copy since


class Node(Record):
    name: str
    api: str = ""
    version: str = ""
    data_servers: list[str] = []
    started: float = Field(default_factory=time.time)
    last_seen: float = Field(default_factory=time.time)
    # the volumes attached here: reads and writes per second (``core/iostats.RATES``)
    io: dict[str, dict[str, float]] = {}


def volume_key(name: str) -> str:
    return f"volumes/{name}"


def server_key(server_id: str) -> str:
    return f"dataservers/{server_id}"


def node_key(name: str) -> str:
    return f"nodes/{name}"


LIVENESS_PREFIX = "leases/nodes/"


def liveness_key(name: str) -> str:
    """Exists while the node's lease is alive."""
    return f"{LIVENESS_PREFIX}{name}"


DRAIN_PREFIX = "drain/"


def drain_key(node: str) -> str:
    """Present while ``node`` is being drained: no new replicas go there."""
    return f"{DRAIN_PREFIX}{node}"


def garbage_key(server_id: str, volume_id: str) -> str:
    """A replica to delete once its data server answers again."""
    return f"garbage/{server_id}/{volume_id}"


def server_up(server: DataServer | None) -> bool:
    return server is not None and server.state is ServerState.UP


SNAPSHOT_PREFIX = "snapshots/"


def snapshot_key(volume: str, name: str = "") -> str:
    """The key of a snapshot of ``volume`` (without ``name``: the prefix of them all)."""
    return f"{SNAPSHOT_PREFIX}{volume}/{name}"
