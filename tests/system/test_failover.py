"""Failover across real hosts: three network namespaces on a private switch (tests/hosts.py),
each with an etcd member, a cargohold node and (for Swarm) its own dockerd.

A host is killed like a power cut (everything of it frozen, its link down, then SIGKILL), or
only cut off the network; etcd members are killed one and two at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.hosts import LEASE_TTL_DEFAULT, Host, Hosts, hosts_for, swarm_failover, wait_for

pytestmark = [pytest.mark.system]

SWARM_HEARTBEAT = "1s"

@pytest.fixture
def hosts(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    """Three hosts with etcd and cargohold (no Docker)."""
    yield from hosts_for(request, docker=False)


@pytest.fixture
def docker_hosts(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    """Three hosts with etcd, cargohold and a dockerd each."""
    yield from hosts_for(request, docker=True)


def test_swarm_service_survives_its_host_being_killed(docker_hosts: Hosts) -> None:
    """The seed scenario (tests/hosts.py: swarm_failover)."""
    result = swarm_failover(docker_hosts, SWARM_HEARTBEAT)
    print(f"\nfailover: host {result.killed} killed -> volume mounted on {result.new_host} "
          f"in {result.mounted_after:.2f} s (task running after {result.running_after:.2f} s; "
          f"lease TTL {docker_hosts.lease_ttl:g} s, Swarm heartbeat {SWARM_HEARTBEAT}; "
          f"{result.acked} writes acknowledged before the kill; phases {result.phases})")
    assert result.seed_ok
    assert result.lost == [], (f"fsync'd before the kill but lost: {result.lost[:20]} "
                               f"(acknowledged up to {result.acked})")
    assert result.mounted_after < 30


def test_split_brain_the_cut_off_writer_is_fenced(hosts: Hosts) -> None:
    a, b, _ = hosts
    a.cli("volume", "create", "v", "--size", "64M", "--replicas", "2")
    mount = a.cli("volume", "attach", "v").stdout.strip()
    status = a.base / "writer.status"
    # Each attempt: append a line, fsync it; record start/end wall time and the outcome.
    writer = a.popen(["sh", "-c",
                      f"i=0; while :; do i=$((i+1)); s=$(date +%s.%N); "
                      f"echo \"a $i\" >> {mount}/alog; "
                      f"if sync {mount}/alog; then r=ok; else r=fail; fi; "
                      f"echo \"$r $i $s $(date +%s.%N)\" >> {status}; sleep 0.05; done"],
                     a.base / "writer.log")
    wait_for(lambda: status.exists() and status.read_text().count("ok ") >= 10, 30,
             "writes on A")

    a.cut_network()
    cut_at = time.time()
    refused = b.cli("volume", "attach", "v", check=False)
    assert refused.returncode == 4, refused.stderr  # A's lease is still alive

    def attach_on_b() -> str | None:
        done = b.cli("volume", "attach", "v", check=False, timeout=60)
        if done.returncode == 0:
            return done.stdout.strip()
        assert done.returncode == 4, done.stderr
        return None

    mount_b = wait_for(attach_on_b, 60, "attach on B after A's lease expired", interval=0.2)
    took_over_at = time.time()
    print(f"\nsplit brain: B attached {took_over_at - cut_at:.2f} s after A was cut off "
          f"(lease TTL {hosts.lease_ttl:g} s)")
    assert b.json("volume", "inspect", "v")["attachment"]["node"] == b.name
    b.run("sh", "-c", f"echo from-b > {mount_b}/b && sync {mount_b}/b")
    seen_by_b = {name: b.read(f"{mount_b}/{name}") for name in ("alog", "b")}

    # A's engine fails the writer's fsync once A's lease is lost, while still cut off: it
    # does not hold it until the network comes back
    def failed_on_a() -> float | None:
        ends = [float(line.split()[3]) for line in status.read_text().splitlines()
                if line.startswith("fail ") and len(line.split()) == 4]
        return min(ends) if ends else None

    first_failure = wait_for(failed_on_a, 30, "an fsync error on A while it is cut off")
    print(f"A's first failed fsync {first_failure - cut_at:.2f} s after the cut")
    assert first_failure - cut_at < hosts.lease_ttl + 5, a.engine_log("v")
    assert "lost its lease" in a.engine_log("v"), a.engine_log("v")

    a.restore_network()
    restored_at = time.time()
    try:
        wait_for(lambda: any(float(line.split()[2]) > restored_at + 1
                             for line in status.read_text().splitlines()
                             if len(line.split()) == 4),
                 60, "A's writer to try writes after its network came back")
    finally:
        writer.kill()
        writer.wait()
    attempts = [line.split() for line in status.read_text().splitlines()
                if len(line.split()) == 4]
    after = [(r, int(i)) for r, i, s, _ in attempts if float(s) > took_over_at]
    longest = max(float(e) - float(s) for _, _, s, e in attempts)
    print(f"A's writer: {sum(r == 'ok' for r, *_ in attempts)} fsyncs ok, "
          f"{sum(r == 'fail' for r, *_ in attempts)} failed, {len(after)} tried after the "
          f"takeover; longest fsync {longest:.1f} s")
    assert after, "A's writer tried nothing after the takeover"
    assert [i for r, i in after if r == "ok"] == [], (
        f"fsync succeeded on A after B took over: {after}\n{a.engine_log('v')}")
    # the engine refused everything after the lease was lost; the data servers fence it
    # too (checked by test_takeover and the data server's tests)

    b.cli("volume", "detach", "v")
    mount_b = b.cli("volume", "attach", "v").stdout.strip()
    assert b.run("ls", mount_b).stdout.split() == sorted(["alog", "b", "lost+found"])
    assert {name: b.read(f"{mount_b}/{name}") for name in ("alog", "b")} == seen_by_b
    b.cli("volume", "detach", "v")


def _leader(hosts: Hosts, among: list[Host]) -> Host:
    return wait_for(lambda: next((h for h in among if h.etcd_is_leader()), None), 20,
                    "an etcd leader")


def test_etcd_one_member_down_works_two_down_fails_clearly(hosts: Hosts) -> None:
    h1, h2, h3 = hosts
    first = _leader(hosts, list(hosts))
    first.kill_etcd()  # the leader: an election on top of a lost member
    via = first  # the node whose own etcd member is gone
    via.cli("volume", "create", "one", "--size", "32M", "--replicas", "2", timeout=60)
    mount = via.cli("volume", "attach", "one", timeout=60).stdout.strip()
    via.run("sh", "-c", f"echo kept > {mount}/f && sync {mount}/f")
    via.cli("volume", "detach", "one", timeout=60)

    second = next(h for h in hosts if h is not first)
    second.kill_etcd()
    for args in (("volume", "ls"), ("volume", "create", "two", "--size", "32M")):
        start = time.monotonic()
        done = via.cli(*args, check=False, timeout=60)
        took = time.monotonic() - start
        print(f"\n{' '.join(args)} with 2 of 3 etcd members down: exit {done.returncode} "
              f"after {took:.1f} s: {done.stderr.strip()}")
        assert done.returncode == 5, done.stdout + done.stderr
        assert "[metadata_unavailable]" in done.stderr
        assert took < 30

    for h in (first, second):
        h.start_etcd(hosts.initial_cluster, state="existing")
    wait_for(lambda: all(h.etcd_healthy() for h in hosts), 30, "etcd healthy again")
    wait_for(lambda: via.cli("volume", "ls", check=False, timeout=60).returncode == 0, 30,
             "volume ls to work again")
    via.cli("volume", "create", "two", "--size", "32M", "--replicas", "2", timeout=60)
    names = {v["name"] for v in via.json("volume", "ls")}
    assert names == {"one", "two"}
    mount = via.cli("volume", "attach", "one", timeout=60).stdout.strip()
    assert via.read(f"{mount}/f").strip() == "kept"
    via.cli("volume", "detach", "one", timeout=60)


def _controller(host: Host, not_: str = "") -> str | None:
    return next((n["name"] for n in host.json("node", "ls", timeout=60)
                 if n["controller"] and n["name"] != not_), None)


def test_controller_moves_when_its_host_dies(hosts: Hosts) -> None:
    first = wait_for(lambda: _controller(hosts[0]), 20, "a controller")
    victim = next(h for h in hosts if h.name == first)
    survivor = next(h for h in hosts if h is not victim)
    killed_at = victim.kill()
    second = wait_for(lambda: _controller(survivor, not_=first), 30, "a new controller")
    took = time.monotonic() - killed_at
    print(f"\ncontroller: host {first} killed -> {second} took over in {took:.1f} s "
          f"(lease {LEASE_TTL_DEFAULT} s)")
    # the lease time, one check period, and etcd's own re-election when the killed host held
    # the etcd leader (etcd then renews every lease once)
    assert took <= 2 * LEASE_TTL_DEFAULT + 3

    # operations keep working, and the new controller marks the dead host's server down
    wait_for(lambda: all(s["state"] == "down" for n in survivor.json("node", "ls", timeout=60)
                         if n["name"] == first for s in n["data_servers"]), 20,
             "the dead host's data server marked down")
    survivor.cli("volume", "create", "after", "--size", "32M", "--replicas", "2", timeout=60)
    holders = {r["node"] for r in survivor.json("volume", "inspect", "after")["replicas"]}
    assert first not in holders and len(holders) == 2
    mount = survivor.cli("volume", "attach", "after", timeout=60).stdout.strip()
    survivor.run("sh", "-c", f"echo ok > {mount}/f && sync {mount}/f")
    survivor.cli("volume", "detach", "after", timeout=60)
