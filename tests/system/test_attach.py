"""Volumes attached as real file systems: FUSE, loop devices, mkfs and mounts (root)."""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cargohold.core.models import Volume
from cargohold.stores.catalog import Catalog
from cargohold.stores.opener import open_store
from tests.conftest import Node, compare_on_disk, leftovers, needs_root
from tests.conftest import sha256_of as _sha256
from tests.conftest import write_random as _write_random

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20


def _mounted(path: str) -> str:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == path:
            return fields[2]
    return ""


def _engine_and_loops(node: Node) -> tuple[list[int], list[str]]:
    return node.engine_pids(), leftovers(node.base)["loops"]


def _edit_volume(node: Node, name: str, **changes: object) -> None:
    async def edit() -> None:
        store = open_store(f"sqlite://{node.state / 'meta.db'}")
        try:
            def change(v: Volume) -> Volume:
                return v.model_copy(update=changes)

            await Catalog(store).update_volume(name, change)
        finally:
            await store.close()

    asyncio.run(edit())


def test_attach_write_detach_reattach_verify(node: Node) -> None:
    node.cli("volume", "create", "pgdata", "--size", "1G", "--replicas", "2")
    mountpoint = node.cli("volume", "attach", "pgdata").stdout.strip()
    assert _mounted(mountpoint) == "ext4"
    assert node.cli("volume", "attach", "pgdata").stdout.strip() == mountpoint  # same mount
    digest = _write_random(Path(mountpoint) / "random.bin", 200 * MIB)
    inspected = node.json("volume", "inspect", "pgdata")
    assert inspected["state"] == "attached" and inspected["attachment"]["node"] == "node1"
    assert all(r["used"] >= 200 * MIB for r in inspected["replicas"])  # both replicas have it
    assert inspected["used"] < 400 * MIB  # thin: a 1G volume holding 200M
    node.cli("volume", "detach", "pgdata")
    assert not _mounted(mountpoint)
    assert _engine_and_loops(node) == ([], [])
    assert node.json("volume", "inspect", "pgdata")["state"] == "detached"
    mountpoint = node.cli("volume", "attach", "pgdata").stdout.strip()
    assert _sha256(Path(mountpoint) / "random.bin") == digest
    node.cli("volume", "detach", "pgdata")
    done = node.cli("volume", "rm", "pgdata")
    assert done.returncode == 0
    node.stop()
    assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}


def _maps_write_buffers(pid: int) -> bool:
    return "memfd:cargohold-writes" in Path(f"/proc/{pid}/maps").read_text()


def test_large_writes_reach_both_replicas_through_shared_memory(node: Node) -> None:
    """The data servers on the engine's host map its write buffers while it is attached
    and write large requests from there; both replicas end up with the same bytes."""
    node.cli("volume", "create", "shm", "--size", "256M", "--replicas", "2")
    mountpoint = Path(node.cli("volume", "attach", "shm").stdout.strip())
    volume = node.json("volume", "inspect", "shm")
    holders = [json.loads((Path(r["path"]) / "process.json").read_text())["pid"]
               for r in volume["replicas"]]
    [engine] = node.engine_pids()
    assert _maps_write_buffers(engine)
    assert all(_maps_write_buffers(pid) for pid in holders), "a data server did not map them"
    data = os.urandom(64 * MIB)
    fd = os.open(mountpoint / "big.bin", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        buffer = mmap.mmap(-1, 4 * MIB)  # page aligned, as O_DIRECT wants
        for at in range(0, len(data), 4 * MIB):
            buffer[:] = data[at:at + 4 * MIB]
            assert os.pwrite(fd, buffer, at) == 4 * MIB
        os.fsync(fd)
    finally:
        os.close(fd)
    node.cli("volume", "detach", "shm")
    deadline = time.monotonic() + 10  # the data servers see the connection close, and unmap
    while any(_maps_write_buffers(pid) for pid in holders) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_maps_write_buffers(pid) for pid in holders)
    node.stop()
    compare_on_disk(volume)  # the replica not read back holds the same bytes
    node.start()
    mountpoint = Path(node.cli("volume", "attach", "shm").stdout.strip())
    assert (mountpoint / "big.bin").read_bytes() == data
    node.cli("volume", "detach", "shm")
    node.cli("volume", "rm", "shm")


def test_xfs_volume(node: Node) -> None:
    node.cli("volume", "create", "logs", "--size", "512M", "--fs", "xfs", "--replicas", "3")
    mountpoint = node.cli("volume", "attach", "logs").stdout.strip()
    assert _mounted(mountpoint) == "xfs"
    (Path(mountpoint) / "f").write_text("hello")
    node.cli("volume", "detach", "logs")
    mountpoint = node.cli("volume", "attach", "logs").stdout.strip()
    assert (Path(mountpoint) / "f").read_text() == "hello"
    node.stop()  # SIGTERM detaches what is attached, stops data servers
    assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}


def test_rm_of_an_attached_volume_is_refused(node: Node) -> None:
    node.cli("volume", "create", "busy", "--size", "64M")
    node.cli("volume", "attach", "busy")
    done = node.cli("volume", "rm", "busy", check=False)
    assert done.returncode == 4 and "is attached on node 'node1'" in done.stderr
    assert node.json("volume", "inspect", "busy")["state"] == "attached"
    node.cli("volume", "detach", "busy")
    node.cli("volume", "rm", "busy")


def test_failed_attach_leaves_nothing_behind(node: Node) -> None:
    node.cli("volume", "create", "odd", "--size", "512M")
    node.cli("volume", "attach", "odd")
    node.cli("volume", "detach", "odd")
    _edit_volume(node, "odd", fs="xfs")  # the record no longer matches what is on disk
    done = node.cli("volume", "attach", "odd", check=False)
    assert done.returncode == 2 and "failed at step 'mount'" in done.stderr
    assert "found ext4" in done.stderr
    assert _engine_and_loops(node) == ([], [])
    assert leftovers(node.base)["mounts"] == []
    inspected = node.json("volume", "inspect", "odd")
    assert inspected["state"] == "detached" and inspected["attachment"] is None
    assert "attach failed at mount" in inspected["last_error"]


def test_killed_data_server_loses_no_fsynced_write(node: Node) -> None:
    node.cli("volume", "create", "ha", "--size", "256M", "--replicas", "2")
    mountpoint = Path(node.cli("volume", "attach", "ha").stdout.strip())
    volume = node.json("volume", "inspect", "ha")
    victim_path = volume["replicas"][1]["path"]
    victim = json.loads((Path(victim_path) / "process.json").read_text())["pid"]
    acked: dict[int, bytes] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            with open(mountpoint / "log.bin", "wb") as f:
                i = 0
                while not stop.is_set() and i < 400:
                    record = os.urandom(64 * 1024)
                    f.write(record)
                    f.flush()
                    os.fsync(f.fileno())
                    acked[i] = record  # fsync returned: this must survive
                    i += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)  # one replica dies in the middle of the writes
    after_kill = len(acked)
    while len(acked) < after_kill + 100 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(30)
    assert not errors, f"writes failed on the survivor: {errors}\n{node.logs()}"
    assert len(acked) >= after_kill + 100, "writes did not continue on the surviving replica"
    assert "leaves the in-sync set" in node.logs()  # marked out of sync when it died
    # The node restarts it and the engine catches it up while attached: both in sync again.
    node.cli("volume", "rebuild", "ha", "--wait")
    inspected = node.json("volume", "inspect", "ha")
    assert [r["state"] for r in inspected["replicas"]] == ["in_sync", "in_sync"]
    assert inspected["attachment"] is not None
    node.cli("volume", "detach", "ha")
    mountpoint = Path(node.cli("volume", "attach", "ha").stdout.strip())
    data = (mountpoint / "log.bin").read_bytes()
    for i, record in acked.items():
        assert data[i * 64 * 1024:(i + 1) * 64 * 1024] == record, f"record {i} lost"
    node.cli("volume", "detach", "ha")


def test_node_crash_while_attached_is_recovered(node: Node) -> None:
    node.cli("volume", "create", "keep", "--size", "64M")
    mountpoint = Path(node.cli("volume", "attach", "keep").stdout.strip())
    (mountpoint / "a").write_text("before")
    node.kill()  # the control plane dies; engine and data servers keep serving the mount
    (mountpoint / "b").write_text("during")
    os.sync()
    node.start()
    assert node.json("volume", "inspect", "keep")["state"] == "attached"
    assert "adopted keep" in node.logs()
    node.cli("volume", "detach", "keep")
    mountpoint = Path(node.cli("volume", "attach", "keep").stdout.strip())
    assert (mountpoint / "a").read_text() == "before"
    assert (mountpoint / "b").read_text() == "during"
    node.stop()
    assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}
