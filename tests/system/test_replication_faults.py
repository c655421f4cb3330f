"""Faults between two real clusters: the remote gone in the middle of a copy and at a
migration's handover, the node running a migration killed at its handover, and a remote
too full for the copy. Each time the source keeps serving, nothing acknowledged is lost,
and each side says where it stands."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.clusters import MIB, Cluster, acked_read_back, attach, two_clusters, until
from tests.conftest import LiveWriter, needs_root, sha256_of, write_random

pytestmark = [needs_root(), pytest.mark.system]


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[tuple[Cluster, Cluster]]:
    with two_clusters(tmp_path) as made:
        yield made


def _api(cluster: Cluster) -> httpx.Client:
    """The node's unix socket API, for polls faster than a CLI run."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(cluster.node.socket)),
                        base_url="http://node", timeout=30)


def _replication(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict(cluster.volume(name)["replication"])


def test_a_copy_cut_off_midway_leaves_the_source_serving(
        clusters: tuple[Cluster, Cluster]) -> None:
    prod, dr = clusters
    prod.cli("volume", "create", "big", "--size", "1G")
    mount = attach(prod, "big")
    first = write_random(mount / "first.bin", 320 * MIB)
    prod.cli("volume", "replicate", "big", "--to", "dr", "--every", "1h")
    with _api(prod) as api:
        until(lambda: api.get("/v1/volumes/big").json()["replication"]["progress"] > 0,
              "the copy to be under way", timeout=60)
    dr.node.kill()  # the remote's API is gone mid-copy
    until(lambda: _replication(prod, "big")["last_error"] != "", "the round to fail")
    rep = _replication(prod, "big")
    assert "Cannot reach remote cluster 'dr'" in rep["last_error"], rep
    assert rep["point"] == "" and rep["sending"] == ""
    assert "last copy failed" in prod.cli("volume", "inspect", "big").stdout
    second = write_random(mount / "second.bin", 8 * MIB)  # the source serves on
    subprocess.run(["sync", "-f", str(mount / "second.bin")], check=True)
    # the copy started before is left behind there: the retry starts anew and finishes
    dr.node.start()
    prod.cli("volume", "replicate", "big", "--now", "--wait")
    rep = _replication(prod, "big")
    assert rep["point"] and rep["last_error"] == "", rep
    prod.cli("volume", "detach", "big")
    dr.cli("volume", "promote", "big")
    there = attach(dr, "big")
    try:
        assert sha256_of(there / "first.bin") == first
        assert sha256_of(there / "second.bin") == second
    finally:
        dr.cli("volume", "detach", "big")


def _held_at_handover(api: httpx.Client, dr: Cluster, name: str, writer: LiveWriter) -> None:
    """With ``writer`` writing: a migration made ready, then its go; once it hands over, the
    remote's node is stopped (SIGSTOP: its API hangs), so the handover waits in its copy
    with the writes held. Returns once the engine holds them (its last point's record says
    ``handover``)."""
    until(lambda: writer.writes > 50, "the writer to start")
    answer = api.post(f"/v1/volumes/{name}/migrate", json={"to": "dr", "hold": True})
    assert answer.status_code == 200, answer.text
    until(lambda: _migration(api, name)["state"] == "ready", "the migration to be ready",
          timeout=120)
    api.post(f"/v1/volumes/{name}/migrate/go")
    deadline = time.monotonic() + 60
    while _migration(api, name)["state"] != "handover":  # before its cut is done
        assert time.monotonic() < deadline, "no handover"
        time.sleep(0.005)
    assert dr.node.proc is not None
    os.kill(dr.node.proc.pid, signal.SIGSTOP)
    while not any(s.get("phase") == "handover"
                  for s in api.get(f"/v1/snapshots?volume={name}").json()):
        assert time.monotonic() < deadline, "the engine did not hold the writes"
        time.sleep(0.01)


def _migration(api: httpx.Client, name: str) -> dict[str, Any]:
    return dict(api.get(f"/v1/volumes/{name}").json()["migration"])


def test_the_remote_gone_at_the_handover(clusters: tuple[Cluster, Cluster]) -> None:
    prod, dr = clusters
    prod.cli("volume", "create", "db", "--size", "256M")
    mount = attach(prod, "db")
    with _api(prod) as api, LiveWriter(mount / "records") as writer:
        _held_at_handover(api, dr, "db", writer)
        dr.node.kill()  # the remote gone while the last copy waits for it
        until(lambda: _migration(api, "db")["state"] in ("failed", "done"), "the handover "
              "to end", timeout=120)
        moving = _migration(api, "db")
        fenced = prod.volume("db")["fenced_by"]
        assert moving["state"] == "failed" and moving["error"], moving
        print(f"\nhandover with the remote gone: fenced={bool(fenced)}: {moving['error']}")
        if not fenced:  # the last copy failed: the writes were let go, the source serves
            before = writer.writes
            until(lambda: writer.writes > before + 20, "the writer to go on")
            assert writer.error is None
        elif "could not make the last point durable" in moving["error"]:
            # fenced while the remote committed, which it never did: the source is the way
            assert "promote db' here" in moving["error"], moving["error"]
        else:  # the remote holds the last point but was not promoted: both ways named
            assert "Promote it there" in moving["error"] and "here" in moving["error"]
    side = dr  # where the records are read back
    if not fenced:
        writer.verify()
        dr.node.start()  # the retry sends what changed since the point the remote holds
        done = prod.cli("volume", "migrate", "db", "--to", "dr", "--wait")
        assert "done" in done.stdout, done.stdout
    elif "could not make the last point durable" in moving["error"]:
        prod.cli("volume", "promote", "db")  # the source again, all of it
        dr.node.start()
        side = prod
    else:
        dr.node.start()
        dr.cli("volume", "promote", "db")
    prod.cli("volume", "detach", "db", check=False)
    there = attach(side, "db")
    try:
        acked_read_back(there / "records", writer.acked)
    finally:
        side.cli("volume", "detach", "db")


def test_the_node_running_a_migration_killed_at_its_handover(
        clusters: tuple[Cluster, Cluster]) -> None:
    prod, dr = clusters
    prod.cli("volume", "create", "app", "--size", "256M")
    mount = attach(prod, "app")
    with _api(prod) as api, LiveWriter(mount / "records") as writer:
        _held_at_handover(api, dr, "app", writer)
        prod.node.kill()  # the engine outlives it, holding the writes a moment
        stopped = time.monotonic()
        before = writer.writes
        until(lambda: writer.writes > before + 20, "the writes to go on", timeout=60)
        print(f"\nwrites went on {time.monotonic() - stopped:.1f} s after the node died")
        assert writer.error is None
    writer.verify()
    assert dr.node.proc is not None
    os.kill(dr.node.proc.pid, signal.SIGCONT)
    prod.node.start()
    moving = prod.volume("app")["migration"]
    assert moving["state"] == "failed" and "interrupted" in moving["error"], moving
    assert prod.volume("app")["fenced_by"] == ""
    done = prod.cli("volume", "migrate", "app", "--to", "dr", "--wait")
    assert "done" in done.stdout
    prod.cli("volume", "detach", "app", check=False)


def test_a_remote_too_full_for_the_copy(clusters: tuple[Cluster, Cluster],
                                        tmp_path: Path) -> None:
    prod, dr = clusters
    prod.cli("volume", "create", "wide", "--size", "100M")
    mount = attach(prod, "wide")
    kept = write_random(mount / "data.bin", 80 * MIB)
    # the remote's disks: 64 MiB file systems (its standby cannot hold the copy)
    dr.node.stop()
    for disk in dr.node.data_dirs:
        image = tmp_path / f"{disk.name}.img"
        subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        for stale in sorted(disk.glob("*")):
            subprocess.run(["rm", "-rf", str(stale)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(disk)], check=True)
    try:
        dr.node.start()
        done = prod.cli("volume", "replicate", "wide", "--to", "dr", "--every", "1h",
                        "--wait", check=False)
        assert done.returncode == 1, done.stderr
        rep = _replication(prod, "wide")
        assert rep["point"] == "" and rep["last_error"], rep
        assert "space" in rep["last_error"].lower(), rep["last_error"]
        print(f"\nthe copy to a full remote: {rep['last_error']}")
        # the source serves on, and holds everything
        more = write_random(mount / "more.bin", 4 * MIB)
        assert sha256_of(mount / "data.bin") == kept and sha256_of(mount / "more.bin") == more
        standby = dr.json("volume", "ls")
        assert all(v["state"] != "attached" for v in standby)
    finally:
        prod.cli("volume", "detach", "wide", check=False)
        dr.node.cleanup()
        for disk in dr.node.data_dirs:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)
