"""Capacity: the over-provisioning limit, and a full data server (real small file system)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Node, needs_root

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20


@pytest.fixture
def small_disk_node(tmp_path: Path) -> Iterator[Node]:
    """A node whose one data server lives on a 96 MiB file system of its own."""
    node = Node(tmp_path, data_servers=1, extra=("--overprovision", "4"))
    disk = node.data_dirs[0]
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)], check=True)
    try:
        node.start()
        yield node
    finally:
        node.cleanup()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


def test_over_provisioning_limit_refuses_clearly(small_disk_node: Node) -> None:
    node = small_disk_node
    node.cli("volume", "create", "a", "--size", "256M", "--replicas", "1")  # 2.7x of 96M
    refused = node.cli("volume", "create", "b", "--size", "200M", "--replicas", "1",
                       check=False)
    assert refused.returncode == 6, refused.stderr
    assert "over-provisioning limit" in refused.stderr and "256M of 384M" in refused.stderr
    assert [v["name"] for v in node.json("volume", "ls")] == ["a"]  # nothing half made
    [info] = node.json("node", "ls")
    [server] = info["data_servers"]
    assert server["provisioned"] == 256 * MIB and server["max_provisioned"] == 384 * MIB


def test_a_full_data_server_gives_enospc_and_keeps_what_was_written(
        small_disk_node: Node) -> None:
    node = small_disk_node
    node.cli("volume", "create", "full", "--size", "256M", "--replicas", "1")
    mountpoint = Path(node.cli("volume", "attach", "full").stdout.strip())
    kept = os.urandom(16 * MIB)
    with open(mountpoint / "kept", "wb") as f:
        f.write(kept)
        f.flush()
        os.fsync(f.fileno())
    failure = None
    with open(mountpoint / "filler", "wb") as f:
        try:
            for _ in range(200):
                f.write(os.urandom(MIB))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            failure = e
    assert failure is not None, "writing 200 MiB onto a 96 MiB disk did not fail"
    print(f"full disk: {failure!r}")
    assert failure.errno in (errno.ENOSPC, errno.EIO)
    assert (mountpoint / "kept").read_bytes() == kept
    node.cli("volume", "detach", "full")
    assert node.json("volume", "inspect", "full")["state"] == "detached"
