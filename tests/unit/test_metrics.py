"""The metrics exposition: request counts and histograms, the cluster's state as series, and
the data server's fault counts."""

from __future__ import annotations

import time

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cargohold.adapters.metrics import Cluster, Scrape, robustness
from cargohold.core.faults import Faults
from cargohold.core.iostats import LATENCY_BOUNDS, IoRates, OpStats, VolumeIo
from cargohold.core.models import (
    Attachment,
    BackupSchedule,
    BackupState,
    DataServer,
    LastBackup,
    Node,
    Replica,
    ReplicaState,
    ServerState,
    Snapshot,
    Volume,
    VolumeState,
)


def _samples(scrape: Scrape) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(scrape).decode()  # type: ignore[arg-type]
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def _volume(name: str, states: list[ReplicaState], wanted: int) -> Volume:
    return Volume(id=name * 4, name=name, size=1 << 30, replica_count=wanted, fs="ext4",
                  state=VolumeState.ATTACHED,
                  replicas=[Replica(server=f"s{i}", state=s) for i, s in enumerate(states)],
                  attachment=Attachment(node="host1", epoch=3))


def test_op_stats_count_bytes_failures_and_latency_buckets() -> None:
    stats = OpStats()
    stats.done(4096, 0.00005)  # below the first bound
    stats.done(4096, 0.0001)  # on a bound: counted in it (le)
    stats.done(1 << 20, 0.003)
    stats.failed(20.0)  # above every bound
    assert (stats.ops, stats.bytes, stats.errors) == (4, 8192 + (1 << 20), 1)
    cumulative = dict(stats.cumulative())
    assert cumulative[0.0001] == 2 and cumulative[0.005] == 3 and cumulative[10.0] == 3
    assert cumulative[float("inf")] == 4
    assert stats.seconds == pytest.approx(20.00315)
    again = OpStats.from_dict(stats.to_dict())
    assert again.to_dict() == stats.to_dict()
    with pytest.raises(ValueError, match="latency buckets"):
        OpStats.from_dict({**stats.to_dict(), "buckets": [0, 1]})
    with pytest.raises(ValueError, match="not request statistics"):
        OpStats.from_dict({"ops": 1})


def test_robustness_by_replicas_in_sync() -> None:
    healthy = _volume("a", [ReplicaState.IN_SYNC] * 2, 2)
    degraded = _volume("b", [ReplicaState.IN_SYNC, ReplicaState.RESYNCING], 2)
    faulted = _volume("c", [ReplicaState.OUT_OF_SYNC] * 2, 2)
    grown = _volume("d", [ReplicaState.IN_SYNC] * 2, 3)  # a third replica still wanted
    assert [robustness(v) for v in (healthy, degraded, faulted, grown)] == [
        "healthy", "degraded", "faulted", "degraded"]


def test_a_node_exports_its_engines_and_metadata_requests_but_not_the_cluster() -> None:
    io = VolumeIo()
    io.write.done(4096, 0.0004)
    io.write.done(4096, 0.0006)
    io.read.failed(0.2)
    meta = {"get": OpStats()}
    meta["get"].done(0, 0.001)
    samples = _samples(Scrape("host2", True, False, meta, {"pg": io}, None))
    labels = (("node", "host2"), ("op", "write"), ("volume", "pg"))
    assert samples[("cargohold_volume_io_operations_total", labels)] == 2
    assert samples[("cargohold_volume_io_bytes_total", labels)] == 8192
    assert samples[("cargohold_volume_io_duration_seconds_bucket",
                    (("le", "0.0005"), *labels))] == 1
    assert samples[("cargohold_volume_io_duration_seconds_bucket",
                    (("le", "+Inf"), *labels))] == 2
    read = (("node", "host2"), ("op", "read"), ("volume", "pg"))
    assert samples[("cargohold_volume_io_errors_total", read)] == 1
    assert samples[("cargohold_metadata_requests_total",
                    (("node", "host2"), ("operation", "get")))] == 1
    assert samples[("cargohold_node_controller", (("node", "host2"),))] == 0
    assert samples[("cargohold_node_lease_alive", (("node", "host2"),))] == 1
    assert not any(name.startswith(("cargohold_volume_state", "cargohold_server_"))
                   for name, _ in samples)  # the cluster's series: only the controller's node
    assert len(LATENCY_BOUNDS) + 1 == sum(
        1 for name, lab in samples if name == "cargohold_volume_io_duration_seconds_bucket"
        and dict(lab)["op"] == "write")


def test_the_controllers_node_exports_the_cluster() -> None:
    now = time.time()
    volumes = [_volume("pg", [ReplicaState.IN_SYNC, ReplicaState.RESYNCING], 2),
               _volume("web", [ReplicaState.IN_SYNC] * 2, 2)]
    volumes[0].replicas[1].progress = 0.25
    volumes[1].last_backup = LastBackup(id="b1", state=BackupState.FAILED, started=now - 60)
    servers = [DataServer(id="s0", node="host1", address="a:1", path="/d0", capacity=100,
                          free=40, used=50, provisioned=200, checksum_errors=2,
                          checksum_repaired=1, last_seen=now),
               DataServer(id="s1", node="host2", address="a:2", path="/d1",
                          state=ServerState.DOWN, last_seen=now)]
    nodes = [Node(name="host1", last_seen=now), Node(name="host2", last_seen=now - 60)]
    snapshots = [Snapshot(id="1" * 32, name="a", volume="pg", volume_id="pgpg", size=1),
                 Snapshot(id="2" * 32, name="b", volume="pg", volume_id="pgpg", size=1,
                          for_clone="x")]  # hidden: taken for a clone
    cluster = Cluster(volumes, servers, nodes, {"host1": True, "host2": True}, snapshots,
                      [BackupSchedule(volume="web", every=3600)], {"pg": 12345, "web": None},
                      stale_after=10, unique={"1" * 32: 4096, "2" * 32: 8192})
    samples = _samples(Scrape("host1", True, True, {}, {}, cluster))
    pg, web = (("volume", "pg"),), (("volume", "web"),)
    assert samples[("cargohold_volume_robustness", (("robustness", "degraded"), *pg))] == 1
    assert samples[("cargohold_volume_robustness", (("robustness", "healthy"), *pg))] == 0
    assert samples[("cargohold_volume_robustness", (("robustness", "healthy"), *web))] == 1
    assert samples[("cargohold_volume_state", (("state", "attached"), *pg))] == 1
    assert samples[("cargohold_volume_replicas_in_sync", pg)] == 1
    assert samples[("cargohold_volume_used_bytes", pg)] == 12345
    assert ("cargohold_volume_used_bytes", web) not in samples  # unknown: no sample
    assert samples[("cargohold_volume_attached", (("node", "host1"), *pg))] == 1
    assert samples[("cargohold_replica_resync_progress_ratio",
                    (("server", "s1"), *pg))] == 0.25
    assert samples[("cargohold_volume_snapshots", pg)] == 1
    assert samples[("cargohold_snapshot_unique_bytes", (("snapshot", "a"), *pg))] == 4096
    assert ("cargohold_snapshot_unique_bytes", (("snapshot", "b"), *pg)) not in samples
    s0, s1 = (("node", "host1"), ("server", "s0")), (("node", "host2"), ("server", "s1"))
    assert samples[("cargohold_server_up", s0)] == 1 and samples[("cargohold_server_up", s1)] == 0
    assert samples[("cargohold_server_checksum_errors_total", s0)] == 2
    assert samples[("cargohold_server_checksum_repaired_total", s0)] == 1
    assert samples[("cargohold_server_provisioned_bytes", s0)] == 200
    assert samples[("cargohold_node_up", (("node", "host1"),))] == 1
    assert samples[("cargohold_node_up", (("node", "host2"),))] == 0  # not seen for 60 s
    assert samples[("cargohold_volume_last_backup_state", (("state", "failed"), *web))] == 1
    assert samples[("cargohold_volume_last_backup_timestamp_seconds", web)] == pytest.approx(
        now - 60)
    assert samples[("cargohold_backup_schedule_interval_seconds", web)] == 3600


def test_faults_count_bad_blocks_once_and_their_repair() -> None:
    faults = Faults()
    faults.found("v", 8192 + 100)  # inside the block at 8192
    faults.found("v", 8192)  # the same block read again: no new error
    faults.found("v", 65536)
    assert faults.checksum_errors == 2
    faults.rewritten("v", 0, 4096)  # another block
    faults.rewritten("w", 8192, 4096)  # another volume
    assert faults.repaired == 0
    faults.rewritten("v", 4096, 8192)  # covers 8192..12288
    assert faults.repaired == 1 and faults.bad == {"v": {65536}}
    faults.rewritten("v", 0, 1 << 20)
    assert faults.repaired == 2 and faults.bad == {}
    assert faults.to_dict() == {"io_errors": 0, "checksum_errors": 2, "repaired": 2}


def test_io_rates_come_from_two_different_counts() -> None:
    rates = IoRates()

    def counted(at: float, reads: int, writes: int) -> VolumeIo:
        io = VolumeIo(at)
        io.read.ops, io.read.bytes = reads, reads * 4096
        io.write.ops, io.write.bytes = writes, writes * 4096
        return io

    assert rates.update({"pg": counted(100.0, 10, 0)})["pg"]["read_iops"] == 0  # first look
    second = rates.update({"pg": counted(102.0, 210, 50)})["pg"]
    assert second == {"read_iops": 100.0, "write_iops": 25.0, "read_bytes": 409600.0,
                      "write_bytes": 102400.0}
    assert rates.update({"pg": counted(102.0, 210, 50)})["pg"] == second  # not counted since
    third = rates.update({"pg": counted(103.0, 210, 60)})["pg"]
    assert third["read_iops"] == 0 and third["write_iops"] == 10.0
    # a new engine (counts start again) and a volume gone
    assert rates.update({"pg": counted(104.0, 5, 5)})["pg"]["write_iops"] == 0
    assert rates.update({}) == {}
