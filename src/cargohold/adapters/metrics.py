"""``GET /metrics``: the node's view of the cluster in the Prometheus text format.

Every node exports what only it knows: its lease, whether it runs the controller, its
metadata store requests, and the I/O of the volumes attached on it (their engines' counts).
The node that runs the controller also exports the cluster's state as recorded in the
metadata store (volumes, replicas, data servers, nodes, snapshots, backups), so that a
Prometheus scraping every node gets each of those series once, from whichever node leads.

Names follow Prometheus' rules: base units (bytes, seconds), ``_total`` counters, labels
``volume``, ``node``, ``server``. States are one series per possible value, 1 for the current.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from cargohold import __version__
from cargohold.core.iostats import OpStats, VolumeIo
from cargohold.core.models import (
    BackupSchedule,
    BackupState,
    DataServer,
    Node,
    ReplicaState,
    ServerState,
    Snapshot,
    Volume,
    VolumeState,
)
from cargohold.services.replication import lag
from cargohold.services.snapshots import SnapshotService
from cargohold.services.volumes import VolumeService
from cargohold.stores.catalog import Catalog

ROBUSTNESS = ("healthy", "degraded", "faulted")
#: Seconds the space of snapshots is reused (it costs a request per replica's server).
SPACE_MAX_AGE = 60.0


def robustness(volume: Volume) -> str:
    """healthy: every wanted replica in sync; degraded: fewer but some; faulted: none."""
    in_sync = len(volume.in_sync())
    if in_sync == 0:
        return "faulted"
    return "healthy" if in_sync >= volume.replica_count else "degraded"


@dataclass
class Cluster:
    """What the metadata store says, read once per scrape (by the controller's node)."""

    volumes: list[Volume]
    servers: list[DataServer]
    nodes: list[Node]
    alive: dict[str, bool]  # node → its lease is alive
    snapshots: list[Snapshot]
    schedules: list[BackupSchedule]
    used: dict[str, int | None]  # volume → bytes its fullest replica takes (None: unknown)
    stale_after: float
    unique: dict[str, int | None] = field(default_factory=dict)  # snapshot id → bytes


@dataclass
class Scrape:
    """One scrape's figures; ``collect`` turns them into metric families."""

    node: str
    lease_alive: bool
    controller: bool
    metadata: dict[str, OpStats]
    engines: dict[str, VolumeIo]  # attached here, by volume name
    cluster: Cluster | None  # only on the controller's node

    def collect(self) -> Iterator[Metric]:
        yield from self._node()
        yield from self._engines()
        if self.cluster is not None:
            yield from _cluster(self.cluster)

    def _node(self) -> Iterator[Metric]:
        node = [self.node]
        info = GaugeMetricFamily("cargohold_node_info", "This node and its version.",
                                 labels=["node", "version"])
        info.add_metric([self.node, __version__], 1)
        yield info
        yield _gauge("cargohold_node_lease_alive", "1 while this node holds its lease in "
                     "the metadata store.", ["node"], [(node, int(self.lease_alive))])
        yield _gauge("cargohold_node_controller", "1 while this node runs the controller.",
                     ["node"], [(node, int(self.controller))])
        yield from _requests(("cargohold_metadata_requests", "cargohold_metadata_request_errors",
                              "", "cargohold_metadata_request_duration_seconds"),
                             "requests to the metadata store", ["node", "operation"],
                             [((self.node, op), s) for op, s in self.metadata.items()])

    def _engines(self) -> Iterator[Metric]:
        rows = [((name, self.node, kind), getattr(io, kind))
                for name, io in sorted(self.engines.items()) for kind in VolumeIo.KINDS]
        yield from _requests(("cargohold_volume_io_operations", "cargohold_volume_io_errors",
                              "cargohold_volume_io_bytes", "cargohold_volume_io_duration_seconds"),
                             "requests of the kernel to the volume's engine on this node "
                             "(read, write, flush, trim)", ["volume", "node", "op"], rows)


def _requests(names: tuple[str, str, str, str], what: str, labels: list[str],
              rows: Sequence[tuple[tuple[str, ...], OpStats]]) -> Iterator[Metric]:
    """Counters of requests, their failures and bytes (no bytes: ""), and their latency
    histogram, named ``names``."""
    ops_name, errors_name, bytes_name, duration_name = names
    ops = CounterMetricFamily(ops_name, f"Count of {what}.", labels=labels)
    errors = CounterMetricFamily(errors_name, f"Failed {what}.", labels=labels)
    size = CounterMetricFamily(bytes_name, f"Bytes of {what}.", labels=labels) if bytes_name \
        else None
    latency = HistogramMetricFamily(duration_name, f"Latency of {what}.", labels=labels)
    for values, stats in rows:
        ops.add_metric(list(values), stats.ops)
        errors.add_metric(list(values), stats.errors)
        if size is not None:
            size.add_metric(list(values), stats.bytes)
        latency.add_metric(list(values), [(_le(b), c) for b, c in stats.cumulative()],
                           stats.seconds)
    yield ops
    yield errors
    if size is not None:
        yield size
    yield latency


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _gauge(name: str, doc: str, labels: list[str],
           rows: Iterable[tuple[list[str], float]]) -> Metric:
    return _family(GaugeMetricFamily, name, doc, labels, rows)


def _counter(name: str, doc: str, labels: list[str],
             rows: Iterable[tuple[list[str], float]]) -> Metric:
    return _family(CounterMetricFamily, name, doc, labels, rows)


def _family(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, doc: str,
            labels: list[str], rows: Iterable[tuple[list[str], float]]) -> Metric:
    family = kind(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


def _states(name: str, doc: str, labels: list[str], state_label: str,
            rows: Iterable[tuple[list[str], str]], states: Iterable[str]) -> GaugeMetricFamily:
    """One series per possible state of each row: 1 for its state, 0 for the others."""
    family = GaugeMetricFamily(name, doc, labels=[*labels, state_label])
    every = list(states)
    for values, current in rows:
        for state in every:
            family.add_metric([*values, state], int(state == current))
    return family


def _cluster(c: Cluster) -> Iterator[Metric]:
    volumes = sorted(c.volumes, key=lambda v: v.name)
    by_name = [([v.name], v) for v in volumes]
    yield _gauge("cargohold_volume_size_bytes", "The volume's size.", ["volume"],
                 ((n, v.size) for n, v in by_name))
    yield _gauge("cargohold_volume_used_bytes", "Bytes the volume's fullest replica takes "
                 "(thin: written blocks, and what its snapshots keep).", ["volume"],
                 ((n, used) for n, v in by_name if (used := c.used.get(v.name)) is not None))
    yield _states("cargohold_volume_state", "The volume's state.", ["volume"], "state",
                  ((n, v.state.value) for n, v in by_name), [s.value for s in VolumeState])
    yield _states("cargohold_volume_robustness", "healthy: every wanted replica in sync; "
                  "degraded: fewer, but some; faulted: none.", ["volume"], "robustness",
                  ((n, robustness(v)) for n, v in by_name), ROBUSTNESS)
    yield _gauge("cargohold_volume_replicas_wanted", "Replicas the volume should have.",
                 ["volume"], ((n, v.replica_count) for n, v in by_name))
    yield _gauge("cargohold_volume_replicas_in_sync", "Replicas in sync (read and written).",
                 ["volume"], ((n, len(v.in_sync())) for n, v in by_name))
    yield _gauge("cargohold_volume_attached", "1 where the volume is attached.",
                 ["volume", "node"], (([v.name, v.attachment.node], 1) for v in volumes
                                      if v.attachment is not None))
    yield _gauge("cargohold_volume_clone_filled_ratio", "A clone's share of its source "
                 "copied so far (1: independent).", ["volume"],
                 ((n, 1.0 if v.origin is None else v.filled) for n, v in by_name if v.source))
    replicas = [([v.name, r.server], r) for v in volumes for r in v.replicas]
    yield _states("cargohold_replica_state", "The replica's state: in_sync, out_of_sync "
                  "(missed writes), resyncing (being brought up to date, or rebuilt).",
                  ["volume", "server"], "state", ((n, r.state.value) for n, r in replicas),
                  [s.value for s in ReplicaState])
    yield _gauge("cargohold_replica_resync_progress_ratio", "Share of a resync or rebuild "
                 "done.", ["volume", "server"],
                 ((n, r.progress) for n, r in replicas if r.state is ReplicaState.RESYNCING))
    yield from _servers(c)
    yield from _nodes(c)
    yield from _snapshots_and_backups(c, volumes)


def _servers(c: Cluster) -> Iterator[Metric]:
    servers = sorted(c.servers, key=lambda s: s.id)
    rows = [([s.id, s.node], s) for s in servers]
    now = time.time()
    yield _gauge("cargohold_server_up", "1 while the data server answers its node's checks.",
                 ["server", "node"],
                 ((n, int(s.state is ServerState.UP and now - s.last_seen <= c.stale_after))
                  for n, s in rows))
    for name, doc, attr in (
            ("capacity_bytes", "Size of the file system holding the data server.", "capacity"),
            ("free_bytes", "Free bytes of that file system.", "free"),
            ("used_bytes", "Bytes the replicas take (written blocks).", "used"),
            ("provisioned_bytes", "Sum of the sizes of the replicas it holds.", "provisioned"),
            ("provisioned_limit_bytes", "Over-provisioning limit (0: none).",
             "max_provisioned"),
            ("reserve_bytes", "Free bytes kept for chunks in use.", "reserve")):
        yield _gauge(f"cargohold_server_{name}", doc, ["server", "node"],
                     ((n, getattr(s, attr)) for n, s in rows))
    yield _counter("cargohold_server_io_errors", "Requests that failed with an I/O error, "
                   "since the data server started.", ["server", "node"],
                   ((n, s.io_errors) for n, s in rows))
    yield _counter("cargohold_server_checksum_errors", "Blocks whose checksum failed when "
                   "read, since the data server started.", ["server", "node"],
                   ((n, s.checksum_errors) for n, s in rows))
    yield _counter("cargohold_server_checksum_repaired", "Blocks found bad and written anew "
                   "from a good copy since.", ["server", "node"],
                   ((n, s.checksum_repaired) for n, s in rows))


def _nodes(c: Cluster) -> Iterator[Metric]:
    now = time.time()
    yield _gauge("cargohold_node_up", "1 while the node holds its lease and reports.",
                 ["node"], (([n.name], int(c.alive.get(n.name, False)
                                            and now - n.last_seen <= c.stale_after))
                            for n in sorted(c.nodes, key=lambda n: n.name)))


def _snapshots_and_backups(c: Cluster, volumes: list[Volume]) -> Iterator[Metric]:
    counts: dict[str, int] = {v.name: 0 for v in volumes}
    for snapshot in c.snapshots:
        if snapshot.volume in counts and not snapshot.for_clone:
            counts[snapshot.volume] += 1
    yield _gauge("cargohold_volume_snapshots", "Snapshots the volume has.", ["volume"],
                 (([name], n) for name, n in counts.items()))
    yield _gauge("cargohold_snapshot_unique_bytes", "Bytes only this snapshot holds (what "
                 "removing it frees), measured at most 60 s ago.", ["volume", "snapshot"],
                 (([s.volume, s.name], unique) for s in c.snapshots
                  if s.volume in counts and not s.for_clone
                  and (unique := c.unique.get(s.id)) is not None))
    done = [(v, v.last_backup) for v in volumes if v.last_backup is not None]
    yield _gauge("cargohold_volume_last_backup_timestamp_seconds", "When the volume's last "
                 "backup ended (or began, while it runs).", ["volume"],
                 (([v.name], b.finished or b.started) for v, b in done))
    yield _states("cargohold_volume_last_backup_state", "The state of the volume's last "
                  "backup.", ["volume"], "state", (([v.name], b.state.value) for v, b in done),
                  [s.value for s in BackupState])
    yield _gauge("cargohold_volume_last_backup_bytes", "Bytes of data the volume's last "
                 "backup held.", ["volume"], (([v.name], b.bytes) for v, b in done))
    yield _gauge("cargohold_backup_schedule_interval_seconds", "Seconds between the "
                 "scheduled backups of the volume.", ["volume"],
                 (([s.volume], s.every) for s in c.schedules))
    copied = [(v, v.replication) for v in volumes if v.replication is not None]
    yield _gauge("cargohold_volume_replication_lag_seconds", "Age of the newest point of the "
                 "volume the remote cluster holds whole: what promoting it would lose (absent "
                 "before the first copy).", ["volume", "remote"],
                 (([v.name, r.remote], age) for v, r in copied
                  if (age := lag(v)) is not None))
    yield _gauge("cargohold_volume_replication_interval_seconds", "Seconds between the "
                 "volume's copies to the remote cluster.", ["volume", "remote"],
                 (([v.name, r.remote], r.every) for v, r in copied))
    yield _gauge("cargohold_volume_replication_failing", "1 while the volume's last copy to "
                 "the remote cluster failed.", ["volume", "remote"],
                 (([v.name, r.remote], int(bool(r.last_error))) for v, r in copied))
    yield _gauge("cargohold_volume_replication_last_bytes", "Bytes the volume's last complete "
                 "copy sent.", ["volume", "remote"],
                 (([v.name, r.remote], r.last_bytes) for v, r in copied))


class Metrics:
    """What ``GET /metrics`` answers, for one node."""

    def __init__(self, catalog: Catalog, volumes: VolumeService, snapshots: SnapshotService,
                 node: str, stale_after: float) -> None:
        self.catalog = catalog
        self.volumes = volumes
        self.snapshots = snapshots
        self._unique: dict[str, int | None] = {}
        self._unique_at = -SPACE_MAX_AGE
        self.node = node
        self.stale_after = stale_after

    async def render(self, lease_alive: bool, controller: bool, metadata: dict[str, OpStats],
                     engines: dict[str, VolumeIo]) -> bytes:
        cluster = await self._cluster() if controller else None
        scrape = Scrape(self.node, lease_alive, controller, metadata, engines, cluster)
        return generate_latest(scrape)  # type: ignore[arg-type] # anything with collect()

    async def _cluster(self) -> Cluster:
        catalog = self.catalog
        volumes, servers, nodes, snapshots, schedules = await asyncio.gather(
            catalog.volumes(), catalog.servers(), catalog.nodes(), catalog.snapshots(),
            catalog.backup_schedules())
        alive = dict(zip([n.name for n in nodes], await asyncio.gather(
            *(catalog.node_alive(n.name) for n in nodes)), strict=True))
        return Cluster(volumes, servers, nodes, alive, snapshots, schedules,
                       await self.volumes.recent_use(volumes), self.stale_after,
                       await self._snapshot_space(snapshots))

    async def _snapshot_space(self, snapshots: list[Snapshot]) -> dict[str, int | None]:
        """Bytes only each snapshot holds, asked of the data servers again once
        ``SPACE_MAX_AGE`` passed or the snapshots changed."""
        now = time.monotonic()
        if now - self._unique_at > SPACE_MAX_AGE or {s.id for s in snapshots} != set(
                self._unique):
            self._unique = await self.snapshots.usage(snapshots)
            self._unique_at = now
        return self._unique
