"""Rebuild and drain across three nodes sharing one metadata store (real processes)."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveWriter, Node, credentials, needs_root

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20


def _three_nodes(base: Path, rebuild_after: str) -> Iterator[dict[str, Node]]:
    meta = f"sqlite://{base / 'meta.db'}"
    nodes: dict[str, Node] = {}
    try:
        for name in ("h1", "h2", "h3"):
            (base / name).mkdir()
            node = Node(base / name, data_servers=1, name=name,
                        extra=("--metadata", meta, "--lease-ttl", "2",
                               "--rebuild-after", rebuild_after, *credentials(base, name)))
            nodes[name] = node
            node.start()
        yield nodes
    finally:
        for node in nodes.values():
            node.cleanup()


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[dict[str, Node]]:
    yield from _three_nodes(tmp_path, rebuild_after="2")


@pytest.fixture
def patient_nodes(tmp_path: Path) -> Iterator[dict[str, Node]]:
    """Three nodes that wait 10 minutes before rebuilding around a data server that is down."""
    yield from _three_nodes(tmp_path, rebuild_after="600")


def _kill_host(node: Node) -> None:
    """The node and its data servers die at once (a host lost for good)."""
    node.kill()
    for pid in node.dataserver_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _holders(node: Node, name: str) -> dict[str, str]:
    """node name -> replica state."""
    return {r["node"]: r["state"] for r in node.json("volume", "inspect", name)["replicas"]}


def _until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.2)


def _lose_a_holder(nodes: dict[str, Node], name: str) -> tuple[str, str, Node]:
    """Kill the first host holding a replica of ``name`` and wait until its replica is
    rebuilt on the third host (and the old one dropped); return the host that kept its
    replica, the spare one and its node."""
    lost, kept = sorted(_holders(nodes["h1"], name))
    spare = ({"h1", "h2", "h3"} - {lost, kept}).pop()
    _kill_host(nodes[lost])
    watcher = nodes[spare]
    _until(lambda: _holders(watcher, name) == {kept: "in_sync", spare: "in_sync"},
           "the replica on the lost host rebuilt on the spare one and the old one dropped")
    return kept, spare, watcher


def _fill(node: Node, name: str) -> str:
    mountpoint = Path(node.cli("volume", "attach", name).stdout.strip())
    data = os.urandom(16 * MIB)
    with open(mountpoint / "data.bin", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    node.cli("volume", "detach", name)
    return hashlib.sha256(data).hexdigest()


def _verify(node: Node, name: str, digest: str) -> None:
    mountpoint = Path(node.cli("volume", "attach", name).stdout.strip())
    assert hashlib.sha256((mountpoint / "data.bin").read_bytes()).hexdigest() == digest
    node.cli("volume", "detach", name)


def test_a_lost_host_is_rebuilt_elsewhere_and_survives_losing_the_other(
        three_nodes: dict[str, Node]) -> None:
    any_node = three_nodes["h1"]
    any_node.cli("volume", "create", "rb", "--size", "128M", "--replicas", "2")
    digest = _fill(any_node, "rb")
    kept, spare, watcher = _lose_a_holder(three_nodes, "rb")
    log = "\n".join(n.logs() for n in three_nodes.values())
    assert "replacing the replica of rb" in log and "resync of rb done" in log

    _kill_host(three_nodes[kept])  # the other original replica is lost too
    _verify(watcher, "rb", digest)  # the rebuilt replica alone has every byte


def test_drain_moves_every_replica_without_lowering_redundancy(
        three_nodes: dict[str, Node]) -> None:
    h1 = three_nodes["h1"]
    h1.cli("volume", "create", "dr", "--size", "128M", "--replicas", "2")
    digest = _fill(h1, "dr")
    victim = sorted(_holders(h1, "dr"))[0]
    h1.cli("node", "drain", victim, "--wait")  # returns once no replica is left there
    holders = _holders(h1, "dr")
    assert victim not in holders and set(holders.values()) == {"in_sync"} and len(holders) == 2
    [view] = [n for n in h1.json("node", "ls") if n["name"] == victim]
    assert view["draining"] and view["replicas"] == 0
    assert "draining" in h1.cli("node", "ls").stdout

    h1.cli("volume", "create", "fresh", "--size", "64M", "--replicas", "2")
    assert victim not in _holders(h1, "fresh")  # nothing new goes to a draining node
    refused = h1.cli("volume", "create", "three", "--size", "64M", "--replicas", "3",
                     check=False)
    assert refused.returncode == 4

    other = next(n for n in three_nodes.values() if n.name != victim)
    _verify(other, "dr", digest)
    undone: dict[str, Any] = h1.json("node", "drain", victim, "--cancel")  # type: ignore[assignment]
    assert undone["draining"] is False
    missing = h1.cli("node", "drain", "nosuch", check=False)
    assert missing.returncode == 3 and "nosuch" in missing.stderr


def test_drain_of_an_attached_volume_rebuilds_while_it_is_in_use(
        three_nodes: dict[str, Node]) -> None:
    h1 = three_nodes["h1"]
    h1.cli("volume", "create", "busy", "--size", "128M", "--replicas", "2")
    digest = _fill(h1, "busy")
    victim = sorted(_holders(h1, "busy"))[0]
    h1.cli("snapshot", "create", "busy@kept")  # the new replica must get it too
    mountpoint = Path(h1.cli("volume", "attach", "busy").stdout.strip())
    with LiveWriter(mountpoint / "live.bin") as writer:
        while writer.writes < 50:
            time.sleep(0.05)
        h1.cli("node", "drain", victim, "--wait")  # the engine fills the new replica
        holders = _holders(h1, "busy")
        assert victim not in holders and set(holders.values()) == {"in_sync"}
        assert len(holders) == 2
        writes_then = writer.writes
        while writer.writes < writes_then + 50:
            assert writer.error is None, writer.error
            time.sleep(0.05)
    writer.verify()
    volume = h1.json("volume", "inspect", "busy")
    assert volume["attachment"]["node"] == "h1"  # attached all along
    assert "back in sync while in use" in h1.logs()
    h1.cli("volume", "detach", "busy")
    other = next(n for n in three_nodes.values() if n.name != victim)
    _verify(other, "busy", digest)
    mountpoint = Path(other.cli("volume", "attach", "busy").stdout.strip())
    LiveWriter(mountpoint / "live.bin").verify_against(writer)
    other.cli("volume", "detach", "busy")
    [snapshot] = other.json("snapshot", "ls", "busy")  # type: ignore[misc]
    now = {r["server"] for r in other.json("volume", "inspect", "busy")["replicas"]}
    assert set(snapshot["servers"]) == now  # kept by the new replica, not the drained one
    other.cli("volume", "create", "busy-then", "--from", "busy@kept")
    _verify(other, "busy-then", digest)


def test_a_node_removed_for_good_is_rebuilt_around_at_once(
        patient_nodes: dict[str, Node]) -> None:
    h1 = patient_nodes["h1"]
    h1.cli("volume", "create", "gone", "--size", "128M", "--replicas", "2")
    digest = _fill(h1, "gone")
    holders = sorted(_holders(h1, "gone"))
    lost = next(n for n in holders if n != "h1")  # h1 drives the test
    kept = next(n for n in holders if n != lost)
    spare = ({"h1", "h2", "h3"} - {lost, kept}).pop()
    alive = h1.cli("node", "rm", lost, check=False)
    assert alive.returncode == 4 and "[node_alive]" in alive.stderr

    _kill_host(patient_nodes[lost])
    _until(lambda: any(n["name"] == lost and n["health"] == "down"
                       for n in h1.json("node", "ls")), f"{lost}'s lease expired")
    refused = h1.cli("node", "rm", lost, check=False)
    assert refused.returncode == 4 and "drain it first" in refused.stderr
    assert _holders(h1, "gone")[lost] == "in_sync"  # nothing changed

    removed = h1.json("node", "rm", lost, "--force")
    assert removed["replicas_to_rebuild"] == 1 and len(removed["data_servers"]) == 1
    assert lost not in {n["name"] for n in h1.json("node", "ls")}
    started = time.monotonic()
    h1.cli("volume", "rebuild", "gone", "--wait")  # waits for the replacement, too
    assert _holders(h1, "gone") == {kept: "in_sync", spare: "in_sync"}
    print(f"rebuilt {time.monotonic() - started:.1f} s after node rm --force (not the "
          "600 s of --rebuild-after)")
    assert "its data server was removed" in "\n".join(n.logs() for n in patient_nodes.values())
    missing = h1.cli("node", "rm", "nosuch", check=False)
    assert missing.returncode == 3

    _kill_host(patient_nodes[kept])  # the rebuilt copy alone has every byte
    _verify(patient_nodes[spare], "gone", digest)


def test_snapshots_survive_a_rebuild_and_the_loss_of_the_other_copy(
        three_nodes: dict[str, Node]) -> None:
    any_node = three_nodes["h1"]
    any_node.cli("volume", "create", "sn", "--size", "128M", "--replicas", "2",
                 "--locality", "off")  # attached on h1 to fill it: no replica moves there
    digest = _fill(any_node, "sn")
    any_node.cli("snapshot", "create", "sn@before")
    later = _fill(any_node, "sn")  # the head moves on: the snapshot keeps the old bytes
    assert later != digest
    kept, spare, watcher = _lose_a_holder(three_nodes, "sn")
    [snapshot] = watcher.json("snapshot", "ls", "sn")  # type: ignore[misc]
    servers = {s["server"]: s["node"] for s in watcher.json("volume", "inspect", "sn")["replicas"]}
    assert sorted(servers[s] for s in snapshot["servers"]) == sorted([kept, spare])

    _kill_host(three_nodes[kept])  # the rebuilt replica alone holds the snapshot now
    _until(lambda: any(n["name"] == kept and n["health"] == "down"
                       for n in watcher.json("node", "ls")), f"{kept}'s lease expired")
    watcher.cli("volume", "create", "sn-clone", "--from", "sn@before", "--replicas", "1")
    _verify(watcher, "sn-clone", digest)
    _verify(watcher, "sn", later)
    watcher.cli("volume", "revert", "sn", "--to", "sn@before")
    _verify(watcher, "sn", digest)
