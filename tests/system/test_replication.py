"""Replication between two real clusters (each a node with its own metadata, CA and
tokens, talking HTTPS): a standby that only a promotion makes usable, copies of changed
chunks only, fencing of a source whose copy was promoted, and the copy back."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clusters import (
    ADMIN,
    MIB,
    Cluster,
    acked_read_back,
    attach,
    metrics,
    two_clusters,
    until,
    write_fails,
)
from tests.conftest import LiveWriter, needs_root, sha256_of, write_random

pytestmark = [needs_root(), pytest.mark.system]


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Cluster]]:
    with two_clusters(tmp_path_factory.mktemp("clusters")) as made:
        yield made


def test_a_remote_is_checked_before_it_is_kept(clusters: tuple[Cluster, Cluster],
                                               tmp_path: Path) -> None:
    prod, dr = clusters
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-0123456789\n")
    done = prod.cli("remote", "add", "bad", "--endpoint", f"https://127.0.0.1:{dr.port}",
                    "--token-file", str(wrong), "--ca", str(dr.ca), check=False)
    assert done.returncode == 2 and "unauthorized" in done.stderr, done.stderr
    done = prod.cli("remote", "add", "bad", "--endpoint", f"https://127.0.0.1:{dr.port}",
                    "--token-file", str(dr.token), check=False)  # the system CAs: refused
    assert done.returncode == 5 and "remote_unavailable" in done.stderr, done.stderr
    done = prod.cli("remote", "add", "self", "--endpoint", f"https://127.0.0.1:{prod.port}",
                    "--token-file", str(prod.token), "--ca", str(prod.ca), check=False)
    assert done.returncode == 2 and "is this cluster" in done.stderr, done.stderr
    assert [r["name"] for r in prod.json("remote", "ls")] == ["dr"]
    shown = prod.cli("remote", "ls").stdout
    assert "dr" in shown and ADMIN not in shown
    raw = (prod.node.state / "meta.db").read_bytes()
    assert ADMIN.encode() not in raw  # the token is kept wrapped
    done = prod.cli("volume", "replicate", "nothing", "--to", "dr", check=False)
    assert done.returncode == 3, done.stderr


def test_copies_promotion_fencing_and_the_way_back(clusters: tuple[Cluster, Cluster]) -> None:
    prod, dr = clusters
    prod.cli("volume", "create", "pgdata", "--size", "256M")
    mount = attach(prod, "pgdata")
    first = write_random(mount / "first.bin", 24 * MIB)
    subprocess.run(["sync", "-f", str(mount / "first.bin")], check=True)

    # the first copy is the whole volume
    prod.cli("volume", "replicate", "pgdata", "--to", "dr", "--every", "1h", "--wait")
    rep = prod.volume("pgdata")["replication"]
    assert rep["point"] and rep["last_error"] == "", rep
    assert rep["last_bytes"] >= 24 * MIB
    standby = dr.volume("pgdata")
    assert standby["replica_of"]["point"] == rep["point"]
    assert "holds point" in dr.cli("volume", "inspect", "pgdata").stdout
    done = dr.cli("volume", "attach", "pgdata", check=False)
    assert done.returncode == 4 and "promote" in done.stderr, done.stderr

    # the next copy sends only what changed
    second = write_random(mount / "second.bin", 4 * MIB)
    subprocess.run(["sync", "-f", str(mount / "second.bin")], check=True)
    prod.cli("volume", "replicate", "pgdata", "--now", "--wait")
    rep = prod.volume("pgdata")["replication"]
    assert 4 * MIB <= rep["last_bytes"] <= 12 * MIB, rep
    assert rep["lag"] is not None and rep["lag"] < 60
    assert "lag" in prod.cli("volume", "inspect", "pgdata").stdout
    scraped = metrics(prod)
    assert 'cargohold_volume_replication_lag_seconds{remote="dr",volume="pgdata"}' in scraped

    # the disaster: the standby is promoted while the source is still attached and in use
    promoted = dr.json("volume", "promote", "pgdata")
    assert promoted["replica_of"] is None and promoted["promoted_from"]["volume"] == "pgdata"
    there = attach(dr, "pgdata")
    assert sha256_of(there / "first.bin") == first
    assert sha256_of(there / "second.bin") == second
    third = write_random(there / "third.bin", 4 * MIB)
    subprocess.run(["sync", "-f", str(there / "third.bin")], check=True)

    # the source learns it at its next copy: fenced, its writes refused
    prod.cli("volume", "replicate", "pgdata", "--now")
    until(lambda: bool(prod.volume("pgdata")["fenced_by"]), "the source to be fenced")
    assert "promoted" in prod.volume("pgdata")["fenced_by"]
    assert write_fails(mount / "late.bin")
    prod.cli("volume", "detach", "pgdata", check=False)
    until(lambda: prod.volume("pgdata")["attachment"] is None, "the source to detach")
    done = prod.cli("volume", "attach", "pgdata", check=False)
    assert done.returncode == 7 and "volume_demoted" in done.stderr, done.stderr

    # the way back: the promoted copy replicates to the old source, which takes only what
    # changed since the point both hold
    dr.add_remote(prod)
    dr.cli("volume", "detach", "pgdata")
    dr.cli("volume", "replicate", "pgdata", "--to", "prod", "--every", "1h", "--wait")
    back = dr.volume("pgdata")["replication"]
    assert back["last_error"] == "" and back["last_bytes"] <= 12 * MIB, back
    old = prod.volume("pgdata")
    assert old["fenced_by"] == "" and old["replica_of"]["point"] == back["point"]
    prod.cli("volume", "promote", "pgdata")
    home = attach(prod, "pgdata")
    try:
        assert sha256_of(home / "first.bin") == first
        assert sha256_of(home / "third.bin") == third
        assert not (home / "late.bin").exists() or (home / "late.bin").stat().st_size == 0
    finally:
        prod.cli("volume", "detach", "pgdata")


def test_a_live_migration_keeps_every_acknowledged_write(
        clusters: tuple[Cluster, Cluster]) -> None:
    prod, dr = clusters
    prod.cli("volume", "create", "live", "--size", "256M")
    mount = attach(prod, "live")
    bulk = write_random(mount / "bulk.bin", 40 * MIB)
    with LiveWriter(mount / "records") as writer:
        until(lambda: writer.writes > 50, "the writer to start")
        done = prod.cli("volume", "migrate", "live", "--to", "dr", "--wait")
        writer.stop()
    moved = prod.volume("live")["migration"]
    assert moved["state"] == "done", moved
    assert 0 < moved["held"] < 30, moved
    assert moved["rounds"][0]["bytes"] >= 40 * MIB
    assert "writes held" in done.stdout
    assert writer.acked, "the writer got nothing acknowledged"
    assert isinstance(writer.error, OSError), writer.error  # the source refuses writes
    assert "migrated to dr" in prod.volume("live")["fenced_by"]
    prod.cli("volume", "detach", "live", check=False)
    until(lambda: prod.volume("live")["attachment"] is None, "the source to detach")

    there = dr.volume("live")
    assert there["replica_of"] is None and there["promoted_from"]["volume"] == "live"
    mounted = attach(dr, "live")
    try:
        assert sha256_of(mounted / "bulk.bin") == bulk
        acked_read_back(mounted / "records", writer.acked)  # every write before the hold
    finally:
        dr.cli("volume", "detach", "live")
