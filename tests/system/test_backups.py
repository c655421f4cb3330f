"""Backups of real volumes to real S3 servers (SeaweedFS and moto's server, on loopback)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import blake3
import pytest

from tests.conftest import Node, leftovers, needs_root, sha256_of, write_random
from tests.s3servers import Moto, S3Server, Seaweed

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20
T = TypeVar("T", bound=S3Server)


def _serving(server: T) -> Iterator[T]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    yield from _serving(Seaweed(tmp_path_factory.mktemp("seaweed")))


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    yield from _serving(Moto(tmp_path_factory.mktemp("moto")))


def _node(tmp_path: Path, server: S3Server, **env: str) -> Node:
    tmp_path.mkdir(parents=True, exist_ok=True)
    node = Node(tmp_path, env={**server.env(), **env})
    node.start()
    return node


def _write_mixed(path: Path, random_mib: int, text_mib: int) -> str:
    """Incompressible then compressible data, fsync'd; returns the sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(random_mib):
            piece = os.urandom(MIB)
            f.write(piece)
            digest.update(piece)
        line = b"2026-12-06 a compressible log line of a database that goes on\n"
        text = (line * (MIB // len(line) + 1))[:MIB]
        for _ in range(text_mib):
            f.write(text)
            digest.update(text)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def test_incremental_deduplicated_backups_restore_and_collection(seaweed: Seaweed,
                                                                tmp_path: Path) -> None:
    seaweed.make_bucket("nightly")
    node = _node(tmp_path, seaweed)
    try:
        shown: Any = node.json("backup", "target", "set", "s3://nightly/cluster-a",
                               "--endpoint", seaweed.endpoint)
        assert shown["encrypted"] is False and shown["url"] == "s3://nightly/cluster-a"
        node.cli("volume", "create", "pg", "--size", "256M")
        mountpoint = Path(node.cli("volume", "attach", "pg").stdout.strip())
        first = _write_mixed(mountpoint / "data.bin", 16, 16)

        full: Any = node.json("backup", "create", "pg", "--wait")
        assert full["state"] == "complete", full
        # 32 MiB of data; the 16 equal text chunks are stored once, and compressed
        assert full["bytes"] >= 32 * MIB and full["new_bytes"] <= full["bytes"] - 12 * MIB
        assert full["new_bytes"] >= 17 * MIB and full["stored"] < full["new_bytes"] - MIB // 2
        # 64 writes of 4 KiB, two in each of 32 chunks: only those chunks are read, and
        # only the pieces that changed are uploaded (deltas on the full backup's blocks)
        with open(mountpoint / "data.bin", "r+b") as f:
            for n in range(64):
                f.seek(n * 512 * 1024 + 8192)
                f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
        later = sha256_of(mountpoint / "data.bin")
        incremental: Any = node.json("backup", "create", "pg", "--wait")
        assert incremental["state"] == "complete", incremental
        assert incremental["new_bytes"] <= 1 * MIB, incremental  # 256 KiB written, + fs
        inspected: Any = node.json("volume", "inspect", "pg")
        assert inspected["last_backup"]["id"] == incremental["id"]
        assert inspected["last_backup"]["state"] == "complete"
        snapshots = [s["name"] for s in node.json("snapshot", "ls", "pg")]  # type: ignore
        assert snapshots == [f"backup-{incremental['id']}"]  # the base of the next one only

        # the same contents in another volume (a clone of that backup's snapshot): nothing
        # new to upload
        node.cli("volume", "create", "pg-copy", "--from", f"pg@{snapshots[0]}", "--wait")
        copy: Any = node.json("backup", "create", "pg-copy", "--wait")
        assert copy["state"] == "complete" and copy["new_bytes"] == 0, copy

        listed: Any = node.json("backup", "ls")
        assert [b["id"] for b in listed] == [full["id"], incremental["id"], copy["id"]]
        assert all(b["state"] == "complete" for b in listed)
        verified = node.cli("backup", "verify", full["id"], "-o", "json")
        checked = json.loads(verified.stdout)
        assert checked["ok"] and checked["blocks"] >= 17, checked  # distinct blocks
        assert checked["kind"] == "verify" and checked["bad"] == {}, checked
        assert f"verifying backup {full['id']}" in verified.stderr  # its progress
        assert node.json("backup", "job", checked["id"])["state"] == "complete"  # type: ignore

        restored: Any = node.json("backup", "restore", full["id"], "--to", "pg-old", "--wait")
        assert restored["state"] == "complete", restored
        old = Path(node.cli("volume", "attach", "pg-old").stdout.strip())
        assert sha256_of(old / "data.bin") == first
        node.cli("volume", "detach", "pg-old")

        removed: Any = node.json("backup", "rm", full["id"])
        # its blocks are the bases of the later one's deltas: kept (the restore below)
        assert removed["deferred"] is False and removed["kept"] >= 17
        assert [b["id"] for b in node.json("backup", "ls", "pg")] == [  # type: ignore
            incremental["id"]]
        assert node.json("backup", "verify", incremental["id"])["ok"]  # type: ignore
        node.json("backup", "restore", incremental["id"], "--to", "pg-new", "--replicas",
                  "1", "--wait")
        new = Path(node.cli("volume", "attach", "pg-new").stdout.strip())
        assert sha256_of(new / "data.bin") == later
        for name in ("pg-new", "pg"):
            node.cli("volume", "detach", name)
        node.stop()
        assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}
    finally:
        node.cleanup()


def test_an_encrypted_target_learns_nothing_and_damage_is_named(moto: Moto,
                                                                tmp_path: Path) -> None:
    moto.make_bucket("sealed")
    key = tmp_path / "backup.key"
    key.write_bytes(os.urandom(32))
    node = _node(tmp_path, moto)
    try:
        shown: Any = node.json("backup", "target", "set", "s3://sealed", "--endpoint",
                               moto.endpoint, "--encryption-key-file", str(key))
        assert shown["encrypted"] is True
        node.cli("volume", "create", "vault", "--size", "64M", "--encrypt")
        mountpoint = Path(node.cli("volume", "attach", "vault").stdout.strip())
        secret = b"the launch codes are 0000\n" * 40_000
        (mountpoint / "codes.txt").write_bytes(secret)
        os.sync()
        done: Any = node.json("backup", "create", "vault", "--wait")
        assert done["state"] == "complete", done
        stored = moto.objects("sealed")
        assert not any(b"launch codes" in blob for blob in stored.values())
        names = {k.rpartition("/")[2] for k in stored if k.startswith("blocks/")}
        assert blake3.blake3(secret[:MIB]).hexdigest() not in names

        # a block damaged in the store: verify names it, a restore fails and leaves nothing
        victim = sorted(k for k in stored if k.startswith("blocks/"))[0]
        blob = bytearray(stored[victim])
        blob[-1] ^= 0xFF
        moto.client().put_object(Bucket="sealed", Key=victim, Body=bytes(blob))
        checked = node.cli("backup", "verify", done["id"], "-o", "json", check=False)
        assert checked.returncode == 1
        assert victim.rpartition("/")[2] in checked.stdout
        failing = node.cli("backup", "restore", done["id"], "--to", "vault-back", "--wait",
                           "-o", "json", check=False)
        assert failing.returncode == 1
        failed = json.loads(failing.stdout)
        assert failed["state"] == "failed" and victim.rpartition("/")[2] in failed["error"]
        assert [v["name"] for v in node.json("volume", "ls")] == ["vault"]  # type: ignore
        taken = node.cli("backup", "restore", done["id"], "--to", "vault", check=False)
        assert taken.returncode != 0 and "volume_exists" in taken.stderr

        # the block put back whole: the restore goes through, with the volume's key
        moto.client().put_object(Bucket="sealed", Key=victim, Body=stored[victim])
        node.json("backup", "restore", done["id"], "--to", "vault-back", "--wait")
        back = Path(node.cli("volume", "attach", "vault-back").stdout.strip())
        assert (back / "codes.txt").read_bytes() == secret
        inspected: Any = node.json("volume", "inspect", "vault-back")
        assert inspected["encryption"]  # restored with the volume's key
        for name in ("vault-back", "vault"):
            node.cli("volume", "detach", name)
    finally:
        node.cleanup()


def test_bad_targets_and_a_server_killed_mid_backup(seaweed: Seaweed, tmp_path: Path) -> None:
    seaweed.make_bucket("faults")
    node = _node(tmp_path / "bad", seaweed, AWS_SECRET_ACCESS_KEY="wrong")
    try:
        refused = node.cli("backup", "target", "set", "s3://faults", "--endpoint",
                           seaweed.endpoint, check=False)
        assert refused.returncode != 0 and "backup_not_authorized" in refused.stderr
        unset = node.cli("backup", "create", "nothing", check=False)
        assert unset.returncode != 0
    finally:
        node.cleanup()
    node = _node(tmp_path / "good", seaweed)
    try:
        missing = node.cli("backup", "target", "set", "s3://no-such-bucket", "--endpoint",
                           seaweed.endpoint, check=False)
        assert missing.returncode != 0 and "backup_bucket_missing" in missing.stderr
        node.cli("backup", "target", "set", "s3://faults/x", "--endpoint", seaweed.endpoint)
        node.cli("volume", "create", "big", "--size", "512M")
        mountpoint = Path(node.cli("volume", "attach", "big").stdout.strip())
        digest = write_random(mountpoint / "data.bin", 192 * MIB)
        started: Any = node.json("backup", "create", "big")
        while True:  # kill the server once the upload is under way
            job: Any = node.json("backup", "ls", "big")[-1]  # type: ignore[index]
            if job["state"] != "running" or job.get("progress", 0) > 0:
                break
        seaweed.stop(signal.SIGKILL)
        try:
            ended = _wait_job(node, "big", started["id"])
            assert ended["state"] == "failed" and "did not answer" in ended["error"], ended
            down = node.cli("backup", "ls", check=False)
            assert down.returncode != 0 and "backup_target_unavailable" in down.stderr
        finally:
            seaweed.start()
        listed: Any = node.json("backup", "ls", "big")
        assert [(b["id"], b["state"]) for b in listed] == [(started["id"], "failed")]
        assert "lost its lease" not in node.logs()  # the node went on meanwhile
        again: Any = node.json("backup", "create", "big", "--wait")
        assert again["state"] == "complete", again
        node.cli("volume", "detach", "big")
        # the target frozen, then killed, while a restore waits for its blocks: the restore
        # fails and leaves no volume behind
        restore: Any = node.json("backup", "restore", again["id"], "--to", "big-half")
        assert seaweed.proc is not None
        os.killpg(seaweed.proc.pid, signal.SIGSTOP)
        seaweed.stop(signal.SIGKILL)
        try:
            deadline = time.monotonic() + 120
            halted: Any = node.json("backup", "job", restore["id"])
            while halted["state"] == "running":
                assert time.monotonic() < deadline, "the restore did not end"
                time.sleep(0.5)
                halted = node.json("backup", "job", restore["id"])
            assert halted["state"] == "failed" and halted["error"], halted
            names = [v["name"] for v in node.json("volume", "ls")]  # type: ignore[attr-defined]
            assert "big-half" not in names
        finally:
            seaweed.start()
        node.json("backup", "restore", again["id"], "--to", "big-back", "--wait")
        back = Path(node.cli("volume", "attach", "big-back").stdout.strip())
        assert sha256_of(back / "data.bin") == digest
        node.cli("volume", "detach", "big-back")
    finally:
        node.cleanup()


def _wait_job(node: Node, volume: str, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """The volume's last backup once it ended (from the cluster: the target may be down)."""
    deadline = time.monotonic() + timeout
    while True:
        found: Any = node.json("volume", "inspect", volume)
        last = found["last_backup"]
        if last["id"] == job_id and last["state"] != "running":
            return last  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"backup {job_id} still running"
        time.sleep(0.5)


def test_a_schedule_outlives_its_controller_and_never_runs_twice(moto: Moto,
                                                                 tmp_path: Path) -> None:
    moto.make_bucket("scheduled")
    node = _node(tmp_path, moto)
    try:
        node.cli("backup", "target", "set", "s3://scheduled", "--endpoint", moto.endpoint)
        node.cli("volume", "create", "app", "--size", "64M")
        short = node.cli("backup", "schedule", "app", "--every", "5s", check=False)
        assert short.returncode != 0 and "--every" in short.stderr
        shown: Any = node.json("backup", "schedule", "app", "--every", "1h", "--keep", "3")
        assert shown["every"] == 3600 and shown["keep"] == 3
        deadline = time.monotonic() + 60  # the first is due at once: the next pass starts it
        while not [b for b in node.json("backup", "ls", "app")  # type: ignore[attr-defined]
                   if b["state"] == "complete"]:
            assert time.monotonic() < deadline, "no scheduled backup"
            time.sleep(0.5)
        node.stop()  # the controller goes; the one that comes reads the schedule
        node.start()
        time.sleep(4)  # several controller passes
        taken: Any = node.json("backup", "ls", "app")
        assert len(taken) == 1 and taken[0]["state"] == "complete", taken
        [schedule] = node.json("backup", "schedules")  # type: ignore[misc]
        assert schedule["last_job"] == taken[0]["id"]
        node.cli("backup", "schedule", "app", "--off")
        assert node.json("backup", "schedules") == []
    finally:
        node.cleanup()


def test_a_standby_follows_the_backups_until_activated(moto: Moto, tmp_path: Path) -> None:
    moto.make_bucket("standby")
    node = _node(tmp_path, moto)
    try:
        node.cli("backup", "target", "set", "s3://standby", "--endpoint", moto.endpoint)
        node.cli("volume", "create", "db", "--size", "128M")
        mountpoint = Path(node.cli("volume", "attach", "db").stdout.strip())
        write_random(mountpoint / "base.bin", 16 * MIB)
        first: Any = node.json("backup", "create", "db", "--wait")
        node.json("backup", "restore", first["id"], "--to", "db-dr", "--standby", "--wait")
        refused = node.cli("volume", "attach", "db-dr", check=False)
        assert refused.returncode != 0 and "activate" in refused.stderr
        # the source moves on: a file rewritten, another removed and trimmed
        later = write_random(mountpoint / "base.bin", 16 * MIB)
        (mountpoint / "new.txt").write_text("after the first backup\n")
        os.sync()
        node.cli("volume", "detach", "db")  # its last writes (the journal) in the backup too
        second: Any = node.json("backup", "create", "db", "--wait")
        deadline = time.monotonic() + 60  # the controller looks every 10 s
        while node.json("volume", "inspect", "db-dr")["restoring"] != second["id"]:  # type: ignore[index]
            assert time.monotonic() < deadline, "the standby did not take the new backup"
            time.sleep(0.5)
        assert "Standby:" in node.cli("volume", "inspect", "db-dr").stdout
        node.json("volume", "activate", "db-dr")
        dr = Path(node.cli("volume", "attach", "db-dr").stdout.strip())
        assert sha256_of(dr / "base.bin") == later
        assert (dr / "new.txt").read_text() == "after the first backup\n"
        node.cli("volume", "detach", "db-dr")
        again = node.cli("volume", "activate", "db-dr", check=False)
        assert again.returncode != 0 and "not a standby" in again.stderr
    finally:
        node.cleanup()


def test_another_cluster_restores_and_a_full_data_server_fails_cleanly(moto: Moto,
                                                                       tmp_path: Path) -> None:
    moto.make_bucket("elsewhere")
    source = _node(tmp_path / "a", moto)
    small = Node(tmp_path / "b", data_servers=1, extra=("--overprovision", "4"),
                 env=moto.env())
    disk = small.data_dirs[0]
    try:
        source.cli("backup", "target", "set", "s3://elsewhere", "--endpoint", moto.endpoint)
        source.cli("volume", "create", "big", "--size", "256M")
        mountpoint = Path(source.cli("volume", "attach", "big").stdout.strip())
        write_random(mountpoint / "data.bin", 120 * MIB)
        done: Any = source.json("backup", "create", "big", "--wait")
        assert done["state"] == "complete", done
        # a cluster of its own, whose one data server has 96 MiB
        disk.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)],
                       check=True)
        small.start()
        small.cli("backup", "target", "set", "s3://elsewhere", "--endpoint", moto.endpoint)
        listed: Any = small.json("backup", "ls")
        assert [b["id"] for b in listed] == [done["id"]]  # the target says what it holds
        failing = small.cli("backup", "restore", done["id"], "--to", "back", "--replicas",
                            "1", "--wait", "-o", "json", check=False)
        assert failing.returncode == 1, failing.stdout + failing.stderr
        job = json.loads(failing.stdout)
        assert job["state"] == "failed" and "space" in job["error"].lower(), job
        assert small.json("volume", "ls") == []  # nothing half made
        assert shutil.disk_usage(disk).used < 8 * MIB  # the replica went with it
        victim = sorted(k for k in moto.objects("elsewhere") if k.startswith("blocks/"))[0]
        moto.client().delete_object(Bucket="elsewhere", Key=victim)
        checked = small.cli("backup", "verify", done["id"], "-o", "json", check=False)
        assert checked.returncode == 1 and victim.rpartition("/")[2] in checked.stdout
    finally:
        small.cleanup()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)
        source.cleanup()
