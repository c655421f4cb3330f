"""Snapshots, clones and reverts of real volumes (root: FUSE, loop devices, ext4)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Node, leftovers, needs_root, sha256_of, write_random

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20
RECORD = 512  # bytes: "%08d" and padding, so records never straddle a write unit


class Appender:
    """Appends record n to each of ``paths`` in turn, fsync after each (the record in a later
    file is written only once the earlier one was acknowledged), in a thread; ``acked``: the
    rounds acknowledged. A cut at one instant holds as many records in an earlier file as in
    a later one, or one more."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self.acked = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            files = [open(path, "ab") for path in self.paths]  # noqa: SIM115 - closed below
            try:
                while not self._stop.is_set():
                    for f in files:
                        f.write(b"%08d" % self.acked + b"." * (RECORD - 9) + b"\n")
                        f.flush()
                        os.fsync(f.fileno())
                    self.acked += 1
            finally:
                for f in files:
                    f.close()
        except BaseException as e:  # noqa: BLE001 - the test checks it
            self.error = e

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _records(path: Path) -> int:
    """How many records the file holds in order from 0 (any torn tail is ignored)."""
    data = path.read_bytes()
    count = 0
    while len(data) >= (count + 1) * RECORD:
        if not data[count * RECORD:].startswith(b"%08d" % count):
            break
        count += 1
    return count


def _replica_image(node: Node, name: str) -> Path:
    volume: Any = node.json("volume", "inspect", name)
    return Path(volume["replicas"][0]["path"]) / "replicas" / volume["id"] / "data"


@pytest.mark.parametrize("freeze", [True, False])
def test_snapshots_of_a_volume_in_use_hold_every_acknowledged_record(node: Node,
                                                                     freeze: bool) -> None:
    node.cli("volume", "create", "pg", "--size", "256M")
    mountpoint = Path(node.cli("volume", "attach", "pg").stdout.strip())
    writer = Appender(mountpoint / "wal")
    taken: list[tuple[str, int]] = []
    try:
        for n in range(3):
            while writer.acked < (n + 1) * 200 and writer.error is None:
                time.sleep(0.01)
            before = writer.acked  # acknowledged before the snapshot was asked for
            args = ["snapshot", "create", f"pg@s{n}"] + ([] if freeze else ["--no-freeze"])
            snap: Any = node.json(*args)
            assert snap["state"] == "ready" and len(snap["servers"]) == 2
            assert snap["held"] < 5.0  # seconds the writers waited (measured in the bench)
            taken.append((f"pg@s{n}", before))
    finally:
        writer.stop()
    assert writer.error is None, writer.error
    listed: Any = node.json("snapshot", "ls", "pg")
    assert [s["ref"] for s in listed] == [ref for ref, _ in taken]
    assert all(s["unique"] is not None for s in listed)

    for k, (ref, before) in enumerate(taken):
        clone = f"c{k}"
        # frozen: filled first, and its image is clean without a journal replay; not
        # frozen: attached while it still fills (read through to the snapshot)
        made: Any = node.json("volume", "create", clone, "--from", ref,
                              *(["--wait"] if freeze else []))
        assert made["source"] == ref and made["size"] == 256 * MIB
        assert (made["origin"] is None) == freeze
        if freeze:
            check = subprocess.run(["e2fsck", "-fn", str(_replica_image(node, clone))],
                                   capture_output=True, text=True, check=False)
            assert check.returncode == 0, check.stdout + check.stderr
        cloned = Path(node.cli("volume", "attach", clone).stdout.strip())
        held = _records(cloned / "wal")
        assert held >= before, f"{ref}: {held} records, {before} were acknowledged before"
        node.cli("volume", "detach", clone)
        node.cli("volume", "rm", clone)
    node.cli("volume", "detach", "pg")
    for ref, _ in taken:
        node.cli("snapshot", "rm", ref)
    node.cli("volume", "rm", "pg")
    node.stop()
    assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}


def test_revert_clone_and_refusals(node: Node) -> None:
    node.cli("volume", "create", "app", "--size", "128M")
    mountpoint = Path(node.cli("volume", "attach", "app").stdout.strip())
    first = write_random(mountpoint / "data.bin", 16 * MIB)
    node.cli("snapshot", "create", "app@one")
    # the same name again is the same snapshot (CSI's idempotent CreateSnapshot)
    again: Any = node.json("snapshot", "create", "app@one")
    assert again["id"] == node.json("snapshot", "ls", "app")[0]["id"]  # type: ignore[index]
    second = write_random(mountpoint / "data.bin", 16 * MIB)
    (mountpoint / "later.txt").write_text("after the snapshot\n")
    assert second != first

    refused = node.cli("volume", "revert", "app", "--to", "app@one", check=False)
    assert refused.returncode != 0 and "attached" in refused.stderr
    refused = node.cli("volume", "rm", "app", check=False)
    assert "volume_in_use" in refused.stderr or "volume_has_snapshots" in refused.stderr
    missing = node.cli("snapshot", "rm", "app@nope", check=False)
    assert missing.returncode != 0 and "snapshot_not_found" in missing.stderr
    bad = node.cli("snapshot", "create", "app", check=False)
    assert bad.returncode != 0 and "invalid_name" in bad.stderr
    unknown = node.cli("volume", "create", "x", "--from", "app@nope", check=False)
    assert unknown.returncode != 0 and "snapshot_not_found" in unknown.stderr
    volumes: Any = node.json("volume", "ls")
    assert [v["name"] for v in volumes] == ["app"]  # nothing half made

    # a clone of the current contents, taken while in use: the snapshot taken for it goes
    # once it is filled
    node.json("volume", "create", "now", "--from", "app", "--wait")
    node.cli("volume", "detach", "app")
    _until(lambda: [s["name"] for s in node.json("snapshot", "ls", "app")] == ["one"],  # type: ignore
           "the snapshot taken for the clone removed")

    node.json("volume", "revert", "app", "--to", "app@one")
    mountpoint = Path(node.cli("volume", "attach", "app").stdout.strip())
    assert sha256_of(mountpoint / "data.bin") == first
    assert not (mountpoint / "later.txt").exists()
    node.cli("volume", "detach", "app")

    now = Path(node.cli("volume", "attach", "now").stdout.strip())
    assert sha256_of(now / "data.bin") == second
    assert (now / "later.txt").read_text() == "after the snapshot\n"
    node.cli("volume", "detach", "now")

    refused = node.cli("volume", "rm", "app", check=False)
    assert refused.returncode != 0 and "volume_has_snapshots" in refused.stderr
    node.cli("snapshot", "rm", "app@one")
    node.cli("volume", "rm", "app")
    node.cli("volume", "rm", "now")
    assert node.json("snapshot", "ls") == []


def _until(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not in {timeout:g} s: {what}"
        time.sleep(0.2)


def test_a_clone_is_usable_at_once_and_fills_in_the_background(tmp_path: Path) -> None:
    node = Node(tmp_path, extra=("--rebuild-rate", "4M"))  # fills take seconds
    try:
        node.start()
        node.cli("volume", "create", "src", "--size", "256M")
        mountpoint = Path(node.cli("volume", "attach", "src").stdout.strip())
        digest = write_random(mountpoint / "data.bin", 48 * MIB)
        original = bytearray((mountpoint / "data.bin").read_bytes())
        node.cli("snapshot", "create", "src@base")
        write_random(mountpoint / "data.bin", 48 * MIB)  # the source moves on

        made: Any = node.json("volume", "create", "fast", "--from", "src@base")
        assert made["origin"]["snapshot"] == "base" and made["filled"] < 1
        cloned = Path(node.cli("volume", "attach", "fast").stdout.strip())
        assert sha256_of(cloned / "data.bin") == digest  # read through to the snapshot
        with open(cloned / "data.bin", "r+b") as f:  # a write into chunks not filled yet
            for at in (5 * MIB + 100, 40 * MIB - 7):
                f.seek(at)
                f.write(b"written while filling")
                original[at:at + 21] = b"written while filling"
            f.flush()
            os.fsync(f.fileno())
        filling: Any = node.json("volume", "inspect", "fast")
        assert filling["origin"] is not None, "filled before the reads: nothing shown"
        assert "Clone of:    src@base (filling" in node.cli("volume", "inspect", "fast").stdout
        refused = node.cli("snapshot", "rm", "src@base", check=False)
        assert refused.returncode != 0 and "snapshot_has_clones" in refused.stderr
        refused = node.cli("snapshot", "create", "fast@early", check=False)
        assert refused.returncode != 0 and "clone_filling" in refused.stderr

        _until(lambda: node.json("volume", "inspect", "fast")["origin"] is None,  # type: ignore
               "the clone filled")
        node.cli("volume", "detach", "fast")
        check = subprocess.run(["e2fsck", "-fn", str(_replica_image(node, "fast"))],
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        # the source goes entirely: the clone depends on nothing
        node.cli("snapshot", "rm", "src@base")
        node.cli("volume", "detach", "src")
        node.cli("volume", "rm", "src")
        cloned = Path(node.cli("volume", "attach", "fast").stdout.strip())
        assert (cloned / "data.bin").read_bytes() == original
        node.cli("snapshot", "create", "fast@now")  # a filled clone has snapshots like any
        node.cli("volume", "detach", "fast")
        node.cli("snapshot", "rm", "fast@now")
        node.cli("volume", "rm", "fast")
        node.stop()
        assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}
    finally:
        node.cleanup()


def test_replica_count_changes_online_and_new_replicas_get_the_snapshots(node: Node) -> None:
    from tests.conftest import LiveWriter

    node.cli("volume", "create", "rc", "--size", "128M", "--replicas", "2")
    mountpoint = Path(node.cli("volume", "attach", "rc").stdout.strip())
    digest = write_random(mountpoint / "data.bin", 8 * MIB)
    node.cli("snapshot", "create", "rc@one")
    with LiveWriter(mountpoint / "live.bin") as writer:
        while writer.writes < 30:
            time.sleep(0.02)
        grown: Any = node.json("volume", "update", "rc", "--replicas", "3", "--wait")
        assert grown["replica_count"] == 3
        assert [r["state"] for r in grown["replicas"]] == ["in_sync"] * 3
        [snap] = node.json("snapshot", "ls", "rc")  # type: ignore[misc]
        assert sorted(snap["servers"]) == sorted(r["server"] for r in grown["replicas"])
        shrunk: Any = node.json("volume", "update", "rc", "--replicas", "1")
        assert shrunk["replica_count"] == 1 and len(shrunk["replicas"]) == 1
        writes = writer.writes
        while writer.writes < writes + 30:  # writes go on through the one left
            assert writer.error is None, writer.error
            time.sleep(0.02)
    writer.verify()
    assert "did not catch up" not in node.logs()
    node.cli("volume", "detach", "rc")
    bad = node.cli("volume", "update", "rc", "--replicas", "9", check=False)
    assert bad.returncode != 0 and "invalid_replicas" in bad.stderr
    back: Any = node.json("volume", "update", "rc", "--replicas", "2", "--wait")  # detached
    assert [r["state"] for r in back["replicas"]] == ["in_sync"] * 2
    node.cli("volume", "create", "rc-then", "--from", "rc@one")
    cloned = Path(node.cli("volume", "attach", "rc-then").stdout.strip())
    assert sha256_of(cloned / "data.bin") == digest
    node.cli("volume", "detach", "rc-then")


def test_a_group_snapshot_is_one_instant_across_volumes(node: Node) -> None:
    for name in ("db", "wal", "cold"):
        node.cli("volume", "create", name, "--size", "128M")
    db = Path(node.cli("volume", "attach", "db").stdout.strip())
    wal = Path(node.cli("volume", "attach", "wal").stdout.strip())
    pair = Appender(db / "log", wal / "log")
    try:
        while pair.acked < 100 and pair.error is None:
            time.sleep(0.01)
        taken: Any = node.json("snapshot", "create", "--group", "nightly", "db", "wal", "cold")
        again: Any = node.json("snapshot", "create", "--group", "nightly", "db", "wal", "cold")
    finally:
        pair.stop()
    assert pair.error is None, pair.error
    assert sorted(s["ref"] for s in taken) == ["cold@nightly", "db@nightly", "wal@nightly"]
    assert {s["id"] for s in again} == {s["id"] for s in taken}  # idempotent
    assert all(s["group"] == "nightly" and s["state"] == "ready" for s in taken)
    alone = node.cli("snapshot", "rm", "db@nightly", check=False)
    assert alone.returncode != 0 and "group" in alone.stderr

    counts = {}
    for name in ("db", "wal"):
        node.cli("volume", "create", f"{name}-n", "--from", f"{name}@nightly", "--wait")
        mountpoint = Path(node.cli("volume", "attach", f"{name}-n").stdout.strip())
        counts[name] = _records(mountpoint / "log")
        node.cli("volume", "detach", f"{name}-n")
    assert counts["db"] - counts["wal"] in (0, 1), counts
    assert counts["wal"] >= 100 - 1

    node.cli("snapshot", "rm", "--group", "nightly")
    assert node.json("snapshot", "ls") == []
    missing = node.cli("snapshot", "rm", "--group", "nightly", check=False)
    assert missing.returncode != 0 and "snapshot_not_found" in missing.stderr
    for name in ("db", "wal"):
        node.cli("volume", "detach", name)


def test_scrub_repairs_a_damaged_snapshot_block(node: Node) -> None:
    import struct

    node.cli("volume", "create", "sc", "--size", "64M", "--replicas", "2")
    mountpoint = Path(node.cli("volume", "attach", "sc").stdout.strip())
    digest = write_random(mountpoint / "data.bin", 8 * MIB)
    node.cli("snapshot", "create", "sc@one")
    write_random(mountpoint / "data.bin", 8 * MIB)  # the head moves: the snapshot's stay home
    node.cli("volume", "detach", "sc")
    volume: Any = node.json("volume", "inspect", "sc")
    replica = Path(volume["replicas"][0]["path"]) / "replicas" / volume["id"]
    log = (replica / "versions").read_bytes()
    records = [log[at : at + 32] for at in range(0, len(log), 32)]
    homes = [struct.unpack_from("<QIIQ", r)[0] for r in records
             if r != bytes(32) and struct.unpack_from("<QIIQ", r)[3] == 0]  # not the room
    assert homes, "the overwrite moved no block the snapshot holds"
    with open(replica / "data", "r+b") as f:  # a bad disk under a block only snapshots read
        f.seek(homes[0] * 4096)
        byte = f.read(1)
        f.seek(homes[0] * 4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    report: Any = node.json("volume", "scrub", "sc")
    fixed = [r for r in report["repaired"] if r.get("snapshot")]
    assert [r["server"] for r in fixed] == [volume["replicas"][0]["server"]], report
    again: Any = node.json("volume", "scrub", "sc")
    assert not [r for r in again["repaired"] if r.get("snapshot")]
    node.cli("volume", "create", "sc-one", "--from", "sc@one", "--replicas", "1")
    clone = Path(node.cli("volume", "attach", "sc-one").stdout.strip())
    assert sha256_of(clone / "data.bin") == digest
    node.cli("volume", "detach", "sc-one")
