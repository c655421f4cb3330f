"""Resync after a transient data server outage: only the chunks it missed are copied."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cargohold.stores.diskstore import DiskChunkStore
from tests.conftest import LiveWriter, Node, compare_on_disk, credentials, needs_root

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20


def _write(path: Path, size: int) -> str:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _states(node: Node, name: str) -> dict[str, str]:
    return {r["path"]: r["state"] for r in node.json("volume", "inspect", name)["replicas"]}


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    """Nodes h1 and h2 sharing one metadata store, one data server each, 2 s leases."""
    meta = f"sqlite://{tmp_path / 'meta.db'}"
    nodes: list[Node] = []
    try:
        for name in ("h1", "h2"):
            (tmp_path / name).mkdir()
            nodes.append(Node(tmp_path / name, data_servers=1, name=name,
                              extra=("--metadata", meta, "--lease-ttl", "2",
                                     *credentials(tmp_path, name))))
            nodes[-1].start()
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            node.cleanup()


def test_a_host_back_after_the_detach_gets_only_what_it_missed(
        two_hosts: tuple[Node, Node]) -> None:
    """The controller's resync of a detached volume (the engine heals attached ones): the
    host of one replica is down while the volume is written and detached, then returns."""
    h1, h2 = two_hosts
    h1.cli("volume", "create", "rs", "--size", "256M", "--replicas", "2")
    mountpoint = Path(h1.cli("volume", "attach", "rs").stdout.strip())
    before = _write(mountpoint / "before.bin", 64 * MIB)
    victim = str(h2.data_dirs[0])
    h2.kill()  # the host goes down: its node and its data server
    os.kill(h2.dataserver_pids()[0], signal.SIGKILL)
    after = _write(mountpoint / "after.bin", 8 * MIB)  # the victim misses these
    assert _states(h1, "rs")[victim] == "out_of_sync"
    h1.cli("volume", "detach", "rs")
    h2.start()  # back, with its data server
    done = h1.cli("volume", "rebuild", "rs", "--wait")  # the controller resyncs
    assert "done" in done.stderr and "in sync" in done.stdout
    assert set(_states(h1, "rs").values()) == {"in_sync"}
    [done] = re.findall(r"resync of rs done: (\d+) of (\d+) chunks copied",
                        h1.logs() + h2.logs())
    copied, total = int(done[0]), int(done[1])
    print(f"resync copied {copied} of {total} chunks (8 MiB written while away)")
    assert 8 <= copied < 32, "only the chunks written while it was away are copied"
    inspected = h1.json("volume", "inspect", "rs")
    assert inspected["in_sync"] == 2

    h1.stop()
    h2.stop()
    compare_on_disk(inspected)

    h2.start()
    mountpoint = Path(h2.cli("volume", "attach", "rs").stdout.strip())
    for name, digest in (("before.bin", before), ("after.bin", after)):
        assert hashlib.sha256((mountpoint / name).read_bytes()).hexdigest() == digest
    h2.cli("volume", "detach", "rs")


def test_a_returning_data_server_catches_up_while_the_volume_is_in_use(
        tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=2)
    try:
        node.start()
        node.cli("volume", "create", "live", "--size", "256M", "--replicas", "2")
        mountpoint = Path(node.cli("volume", "attach", "live").stdout.strip())
        before = _write(mountpoint / "before.bin", 64 * MIB)  # 64 chunks it must not copy
        victim = node.json("volume", "inspect", "live")["replicas"][1]["path"]
        with LiveWriter(mountpoint / "live.bin") as writer:
            while writer.writes < 50:
                time.sleep(0.05)
            os.kill(json.loads((Path(victim) / "process.json").read_text())["pid"],
                    signal.SIGKILL)
            after = _write(mountpoint / "after.bin", 8 * MIB)  # the victim misses these
            # The node restarts the data server; the engine finds it up and catches it up
            # while the writer goes on (no detach).
            deadline = time.monotonic() + 60
            while _states(node, "live")[victim] != "in_sync":
                assert time.monotonic() < deadline, node.logs()
                assert writer.error is None, writer.error
                time.sleep(0.1)
            writes_at_rejoin = writer.writes
            while writer.writes < writes_at_rejoin + 50:  # and goes on after it rejoined
                assert writer.error is None, writer.error
                time.sleep(0.05)
        writer.verify()
        assert "leaves the in-sync set" in node.logs()  # it was out of sync, then caught up
        inspected = node.json("volume", "inspect", "live")
        assert inspected["attachment"] is not None and inspected["in_sync"] == 2
        [done] = re.findall(r"back in sync while in use: (\d+) of (\d+) chunks copied",
                            node.logs())
        copied, total = int(done[0]), int(done[1])
        print(f"caught up while in use: {copied} of {total} chunks copied; "
              f"{writer.writes} acknowledged writes by the application meanwhile")
        assert 8 <= copied < 64, "only the chunks written while it was away are copied"

        node.cli("volume", "detach", "live")
        node.stop()
        compare_on_disk(inspected)
        node.start()
        mountpoint = Path(node.cli("volume", "attach", "live").stdout.strip())
        for name, digest in (("before.bin", before), ("after.bin", after)):
            assert hashlib.sha256((mountpoint / name).read_bytes()).hexdigest() == digest
        writer.verify()  # on the re-attached volume
        node.cli("volume", "detach", "live")
        node.cli("volume", "rm", "live")
    finally:
        node.cleanup()


def test_a_volume_whose_copies_all_failed_is_salvaged_from_the_newest(
        two_hosts: tuple[Node, Node]) -> None:
    h1, h2 = two_hosts
    h1.cli("volume", "create", "sv", "--size", "128M", "--replicas", "2")
    mountpoint = Path(h1.cli("volume", "attach", "sv").stdout.strip())
    first = _write(mountpoint / "first.bin", 8 * MIB)
    h2.kill()  # h2's host goes down: its copy misses what comes next
    os.kill(h2.dataserver_pids()[0], signal.SIGKILL)
    second = _write(mountpoint / "second.bin", 8 * MIB)
    newest = str(h1.data_dirs[0])
    os.kill(h1.dataserver_pids()[0], signal.SIGKILL)  # and then the other copy fails
    with pytest.raises(OSError):
        _write(mountpoint / "third.bin", 8 * MIB)
    assert set(_states(h1, "sv").values()) == {"out_of_sync"}
    h1.cli("volume", "detach", "sv")
    refused = h1.cli("volume", "attach", "sv", check=False)
    assert refused.returncode != 0 and "volume salvage sv" in refused.stderr

    h2.start()  # the stale copy is back too: salvage must not pick it
    done = h1.json("volume", "salvage", "sv")
    inspected = h1.json("volume", "inspect", "sv")
    [chosen] = [r for r in inspected["replicas"] if r["server"] == done["in_sync"]]
    assert chosen["path"] == newest and done["unreachable"] == []
    again = h1.cli("volume", "salvage", "sv", check=False)
    assert again.returncode == 4 and "[nothing_to_salvage]" in again.stderr
    h1.cli("volume", "rebuild", "sv", "--wait")  # the stale copy is resynced from it
    assert set(_states(h1, "sv").values()) == {"in_sync"}
    mountpoint = Path(h2.cli("volume", "attach", "sv").stdout.strip())
    for name, digest in (("first.bin", first), ("second.bin", second)):
        assert hashlib.sha256((mountpoint / name).read_bytes()).hexdigest() == digest
    h2.cli("volume", "detach", "sv")


def test_a_host_back_gets_the_trims_it_missed_as_holes(two_hosts: tuple[Node, Node]) -> None:
    """Trims take generations like writes: a replica whose host was down while files were
    deleted and trimmed gets those chunks, as holes (before, it kept the file's old bytes
    where the other copy reads zeros), with the same generations: also for chunks written
    and trimmed while it was away, which it never had."""
    h1, h2 = two_hosts
    h1.cli("volume", "create", "tr", "--size", "256M", "--replicas", "2")
    mountpoint = Path(h1.cli("volume", "attach", "tr").stdout.strip())
    _write(mountpoint / "gone.bin", 32 * MIB)
    subprocess.run(["fstrim", str(mountpoint)], check=True)  # free space trimmed once
    victim = str(h2.data_dirs[0])
    h2.kill()
    os.kill(h2.dataserver_pids()[0], signal.SIGKILL)
    _write(mountpoint / "brief.bin", 8 * MIB)  # chunks the victim never had...
    for name in ("gone.bin", "brief.bin"):
        (mountpoint / name).unlink()
    subprocess.run(["sync", "--file-system", str(mountpoint)], check=True)
    subprocess.run(["fstrim", str(mountpoint)], check=True)  # ...trimmed too: all missed
    kept = _write(mountpoint / "kept.bin", 4 * MIB)
    assert _states(h1, "tr")[victim] == "out_of_sync"
    h1.cli("volume", "detach", "tr")
    h2.start()
    h1.cli("volume", "rebuild", "tr", "--wait")
    inspected = h1.json("volume", "inspect", "tr")
    assert inspected["in_sync"] == 2

    h1.stop()
    h2.stop()
    compare_on_disk(inspected)  # the victim reads zeros where gone.bin was
    used = {}
    for replica in inspected["replicas"]:
        store = DiskChunkStore(Path(replica["path"]))
        try:
            used[replica["path"]] = store.replica(inspected["id"]).info().used
        finally:
            store.close()
    other = next(p for p in used if p != victim)
    print(f"allocated: victim {used[victim] / MIB:.1f} MiB, other {used[other] / MIB:.1f} MiB")
    assert used[victim] <= used[other] + 4 * MIB, "copied trims stay holes"

    h2.start()
    mountpoint = Path(h2.cli("volume", "attach", "tr").stdout.strip())
    assert hashlib.sha256((mountpoint / "kept.bin").read_bytes()).hexdigest() == kept
    h2.cli("volume", "detach", "tr")
