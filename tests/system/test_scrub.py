"""Scrub: flipped bytes in a chunk file on disk are found, repaired and reported."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveWriter, Node, needs_root

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20


def _scrub(node: Node, name: str) -> dict[str, Any]:
    report: dict[str, Any] = node.json("volume", "scrub", name)  # type: ignore[assignment]
    return report


def _wait_for_metric(node: Node, line: str, timeout: float = 20.0) -> None:
    """Until the node's /metrics has ``line`` (the data servers report every second)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(node.socket))) as client:
        while True:
            text = client.get("http://n/metrics").text
            if line in text.splitlines():
                return
            if time.monotonic() > deadline:
                found = [t for t in text.splitlines() if t.startswith(line.split("{")[0])]
                raise AssertionError(f"no {line!r} in /metrics: {found}")
            time.sleep(0.2)


def test_scrub_repairs_a_corrupted_copy_and_reports_it(tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=2)
    try:
        node.start()
        node.cli("volume", "create", "sc", "--size", "64M", "--replicas", "2")
        mountpoint = Path(node.cli("volume", "attach", "sc").stdout.strip())
        data = os.urandom(8 * MIB)
        (mountpoint / "f").write_bytes(data)
        node.cli("volume", "detach", "sc")  # flushes every copy

        clean = _scrub(node, "sc")
        assert clean["chunks"] >= 8 and clean["repaired"] == [] and clean["lost"] == []
        volume = node.json("volume", "inspect", "sc")
        victim = volume["replicas"][0]
        [image] = Path(victim["path"]).rglob(f"{volume['id']}/data")
        with open(image, "r+b") as f:  # flip bytes inside a written block of one copy
            size = f.seek(0, os.SEEK_END)
            for offset in range(0, size, MIB):
                f.seek(offset)
                block = f.read(64)
                if block.strip(b"\0"):
                    f.seek(offset)
                    f.write(bytes(b ^ 0xFF for b in block))
                    flipped = offset
                    break
            else:
                pytest.fail("no written block found in the replica's data file")

        found = _scrub(node, "sc")
        assert found["repaired"] == [{"chunk": flipped // MIB, "server": victim["server"]}]
        assert found["lost"] == []
        # the data server counted the bad block and its repair; /metrics says so
        labels = f'{{node="{node.name}",server="{victim["server"]}"}}'
        _wait_for_metric(node, f"cargohold_server_checksum_errors_total{labels} 1.0")
        _wait_for_metric(node, f"cargohold_server_checksum_repaired_total{labels} 1.0")
        text = node.cli("volume", "scrub", "sc").stdout  # and now it is clean again
        assert "repaired: 0 copies" in text and "lost: 0 chunks" in text

        mountpoint = Path(node.cli("volume", "attach", "sc").stdout.strip())
        assert hashlib.sha256((mountpoint / "f").read_bytes()).digest() == \
            hashlib.sha256(data).digest()
        node.cli("volume", "detach", "sc")
        missing = node.cli("volume", "scrub", "nosuch", check=False)
        assert missing.returncode == 3
    finally:
        node.cleanup()


def test_a_read_that_hits_a_bad_copy_is_answered_and_repairs_it(tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=2)
    try:
        node.start()
        node.cli("volume", "create", "rr", "--size", "64M", "--replicas", "2")
        mountpoint = Path(node.cli("volume", "attach", "rr").stdout.strip())
        data = os.urandom(4 * MIB)
        with open(mountpoint / "f", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        volume = node.json("volume", "inspect", "rr")
        first = volume["replicas"][0]  # the engine reads this copy first
        [image] = Path(first["path"]).rglob(f"{volume['id']}/data")
        with open(image, "r+b") as f:  # every written 4 KiB block of this copy goes bad
            size = f.seek(0, os.SEEK_END)
            for offset in range(0, size, 4096):
                f.seek(offset)
                block = f.read(4096)
                if block.strip(b"\0"):
                    f.seek(offset)
                    f.write(bytes(b ^ 0x5A for b in block))
        Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the next read reaches the engine
        assert (mountpoint / "f").read_bytes() == data  # answered from the good copy
        log = (node.state / "engines" / "rr" / "engine.log").read_text()
        assert "Checksum mismatch" in log and "repaired" in log
        assert {r["state"] for r in node.json("volume", "inspect", "rr")["replicas"]} == \
            {"in_sync"}  # a bad block is repaired, the replica stays in the in-sync set
        node.cli("volume", "detach", "rr")
        report = _scrub(node, "rr")
        assert report["lost"] == []
        print(f"after read repair the scrub still rewrote {len(report['repaired'])} chunks")
        mountpoint = Path(node.cli("volume", "attach", "rr").stdout.strip())
        assert (mountpoint / "f").read_bytes() == data
        node.cli("volume", "detach", "rr")
    finally:
        node.cleanup()


MARK = b"cargohold-scrub!"


def test_scrub_of_a_volume_in_use_repairs_a_corrupted_copy(tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=2)
    try:
        node.start()
        node.cli("volume", "create", "su", "--size", "64M", "--replicas", "2")
        mountpoint = Path(node.cli("volume", "attach", "su").stdout.strip())
        data = b"".join(MARK + os.urandom(4096 - len(MARK)) for _ in range(2048))  # 8 MiB
        with open(mountpoint / "f", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        volume = node.json("volume", "inspect", "su")
        victim = volume["replicas"][0]
        [image] = Path(victim["path"]).rglob(f"{volume['id']}/data")
        with LiveWriter(mountpoint / "live.bin") as writer:
            while writer.writes < 20:
                time.sleep(0.05)
            with open(image, "r+b") as disk:  # flip bytes in a block of f on one copy
                size = disk.seek(0, os.SEEK_END)
                for offset in range(0, size, 4096):
                    disk.seek(offset)
                    if disk.read(len(MARK)) == MARK:
                        disk.seek(offset + 100)
                        disk.write(b"\xff" * 64)
                        flipped = offset
                        break
                else:
                    pytest.fail("no block of f found in the replica's data file")
            found = _scrub(node, "su")  # attached, the writer going on
            assert found["repaired"] == [{"chunk": flipped // MIB, "server": victim["server"]}]
            assert found["lost"] == [] and found["chunks"] >= 8
            again = _scrub(node, "su")
            assert again["repaired"] == [] and again["lost"] == []
            assert writer.writes > 20 and writer.error is None
        writer.verify()
        assert node.json("volume", "inspect", "su")["attachment"] is not None
        assert hashlib.sha256((mountpoint / "f").read_bytes()).digest() == \
            hashlib.sha256(data).digest()
        node.cli("volume", "detach", "su")
        assert _scrub(node, "su")["repaired"] == []  # detached: clean on every copy
    finally:
        node.cleanup()
