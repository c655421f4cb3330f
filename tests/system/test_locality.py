"""Locality across real hosts (tests/hosts.py: three network namespaces with etcd; h3 has no
data server): a volume attached where it has no replica gets one there while in use, with
every write kept; a planned move prepares a replica on a chosen node; strict refuses an
attach where no replica can be local, best-effort does not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.hosts import Host, Hosts, hosts_for, swarm_planned_move, wait_for

pytestmark = [pytest.mark.system]


@pytest.fixture
def hosts(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    def no_disk_on_h3(hosts: Hosts) -> None:
        hosts[2].data_dirs = []

    yield from hosts_for(request, docker=False, configure=no_disk_on_h3)


@pytest.fixture
def docker_hosts(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    yield from hosts_for(request, docker=True)


def test_a_swarm_service_moves_to_a_prepared_replica(docker_hosts: Hosts) -> None:
    """``volume move`` first, then ``docker service update --constraint-add``: the task
    starts on the target with the volume's replica there, every write kept (the time it
    costs against Swarm's own is measured by benchmarks/failover_bench.py --mode planned)."""
    result = swarm_planned_move(docker_hosts)
    print(f"\nplanned move {result.source} -> {result.target}: task running after "
          f"{result.moved:.2f} s (volume mounted after {result.mounted:.2f} s); Swarm moves "
          f"a service without a volume in {result.baseline:.2f} s; replica prepared in "
          f"{result.prepare:.2f} s; {result.acked} writes before the move")
    assert result.seed_ok and result.acked >= 20
    assert result.lost == [], f"lost: {result.lost[:20]}"
    assert result.local  # it read its own replica from the first read on


def _replica_nodes(host: Host, name: str) -> list[str]:
    volume: dict[str, Any] = host.json("volume", "inspect", name)
    return sorted(r["node"] for r in volume["replicas"])


def _settled(host: Host, name: str, nodes: list[str]) -> bool:
    """Replicas exactly on ``nodes``, all in sync, none on its way."""
    volume: dict[str, Any] = host.json("volume", "inspect", name)
    return (sorted(r["node"] for r in volume["replicas"]) == nodes
            and all(r["state"] == "in_sync" and not r["replaces"] for r in volume["replicas"]))


def _sha(host: Host, path: str) -> str:
    return host.run("sha256sum", path, timeout=60).stdout.split()[0]


def test_a_replica_follows_the_volume_and_strict_stays_local(hosts: Hosts) -> None:
    h1, h2, h3 = hosts
    h1.cli("volume", "create", "pg", "--size", "256M", "--replicas", "1")
    [home] = _replica_nodes(h1, "pg")
    user = h2 if home == h1.name else h1  # a host with a data server but no replica
    mountpoint = user.cli("volume", "attach", "pg").stdout.strip()
    before = f"{mountpoint}/before"
    user.run("dd", "if=/dev/urandom", f"of={before}", "bs=1M", "count=48", "conv=fsync",
             timeout=120)
    want = _sha(user, before)
    # the controller moves the replica here while the volume is in use; writes go on
    during = f"{mountpoint}/during"
    writer = user.popen(["dd", "if=/dev/urandom", f"of={during}", "bs=1M", "count=64",
                         "conv=fsync"], user.base / "dd.log")
    wait_for(lambda: user.name in _replica_nodes(user, "pg"), 60,
             f"a replica of pg on {user.name}")
    assert writer.wait(120) == 0
    wait_for(lambda: _settled(user, "pg", [user.name]), 120,
             f"pg's only replica on {user.name}, in sync")
    volume: dict[str, Any] = user.json("volume", "inspect", "pg")
    assert volume["replica_count"] == 1 and volume["locality"] == "best-effort"
    user.run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")  # read what the replica has
    assert _sha(user, before) == want
    written = _sha(user, during)
    user.cli("volume", "detach", "pg")

    # a planned move back, detached (the controller's resync fills it); progress shown
    moved = h3.cli("volume", "move", "pg", "--to", home, "--wait")
    assert "rebuilding pg" in moved.stderr and "done" in moved.stderr
    wait_for(lambda: _settled(h3, "pg", [home]), 60, f"pg's replica on {home}")
    h3.cli("volume", "move", "pg", "--to", home)  # already there: nothing to do
    assert _settled(h3, "pg", [home])
    refused = h3.cli("volume", "move", "pg", "--to", h3.name, check=False)
    assert refused.returncode == 4 and "[not_local]" in refused.stderr

    # h3 has no data server: best-effort attaches there (reads stay remote), strict refuses
    mountpoint = h3.cli("volume", "attach", "pg").stdout.strip()
    assert _sha(h3, f"{mountpoint}/before") == want
    assert _sha(h3, f"{mountpoint}/during") == written
    h3.cli("volume", "detach", "pg")
    assert _replica_nodes(h3, "pg") == [home]
    h3.cli("volume", "update", "pg", "--locality", "strict")
    strict = h3.cli("volume", "attach", "pg", check=False)
    assert strict.returncode == 4 and "[not_local]" in strict.stderr
    volume = h3.json("volume", "inspect", "pg")
    assert volume["state"] == "detached" and volume["attachment"] is None
    assert not h3.mounted("pg")
    bad = h3.cli("volume", "update", "pg", "--locality", "nearby", check=False)
    assert bad.returncode == 2 and "[invalid_locality]" in bad.stderr
    h1.cli("volume", "rm", "pg")
