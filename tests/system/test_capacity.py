"""Capacity: the over-provisioning limit, and a full data server (real small file system)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, Node, needs_root, sha256_of, write_random

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


def _fill(path: Path, limit: int = 200) -> OSError | None:
    """Write 1 MiB pieces with fsync until the volume's data server refuses."""
    with open(path, "wb") as f:
        try:
            for _ in range(limit):
                f.write(os.urandom(MIB))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            return e
    return None


def _take_the_rest(path: Path) -> None:
    """Fill the file system holding ``path`` with a file until it says ENOSPC."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"t" * (64 << 10))
                f.flush()
        except OSError:
            pass


def _data_dir_used(node: Node) -> int:
    st = os.statvfs(node.data_dirs[0])
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_a_full_data_server_recovers_after_delete_and_fstrim(small_disk_node: Node) -> None:
    """Full server → ENOSPC; delete + fstrim frees its space; the volume works and
    re-attaches with its in-sync replica and its data intact."""
    node = small_disk_node
    node.cli("volume", "create", "full", "--size", "256M", "--replicas", "1")
    mountpoint = Path(node.cli("volume", "attach", "full").stdout.strip())
    kept = write_random(mountpoint / "kept", 16 * MIB)
    failure = _fill(mountpoint / "filler")
    assert failure is not None and failure.errno == errno.ENOSPC, f"{failure!r}\n{node.logs()}"
    full = _data_dir_used(node)
    # full as the data server lets itself get: new chunks stop at its reserve (an eighth of
    # this 96 MiB disk), writes into chunks in use go on, so how much is left varies
    assert full > 78 * MIB, full

    (mountpoint / "filler").unlink()
    # ext4 frees a deleted file's blocks at the journal commit of the unlink (fsync of the
    # directory forces it); fstrim sees them only then
    directory = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    trimmed = subprocess.run(["fstrim", "-v", str(mountpoint)], capture_output=True, text=True)
    assert trimmed.returncode == 0, trimmed.stderr + node.logs()
    freed = full - _data_dir_used(node)
    print(f"{trimmed.stdout.strip()}; data server freed {freed / MIB:.1f} MiB")
    assert freed > 48 * MIB, node.logs()

    again = write_random(mountpoint / "again", 32 * MIB)  # writes succeed again
    assert sha256_of(mountpoint / "kept") == kept
    node.cli("volume", "detach", "full")
    volume = node.json("volume", "inspect", "full")
    assert volume["state"] == "detached" and volume["in_sync"] == 1, volume

    mountpoint = Path(node.cli("volume", "attach", "full").stdout.strip())
    assert sha256_of(mountpoint / "kept") == kept
    assert sha256_of(mountpoint / "again") == again
    node.cli("volume", "detach", "full")


def test_a_full_data_server_keeps_the_replica_in_sync_and_attachable(
        small_disk_node: Node) -> None:
    """Detach while the server is full, attach again: fencing needs no free space, so the
    replica stays in sync (nothing was lost) and the volume attaches."""
    node = small_disk_node
    node.cli("volume", "create", "full", "--size", "256M", "--replicas", "1")
    mountpoint = Path(node.cli("volume", "attach", "full").stdout.strip())
    kept = write_random(mountpoint / "kept", 16 * MIB)
    assert _fill(mountpoint / "filler") is not None
    node.cli("volume", "detach", "full")
    # what the space reserve kept back (it refuses new chunks, not writes into chunks in
    # use, so how much is left varies) is taken by another tenant of the disk: none left
    _take_the_rest(node.data_dirs[0] / "other-tenant")
    assert os.statvfs(node.data_dirs[0]).f_bavail * 4096 < MIB  # full

    attached = node.cli("volume", "attach", "full", check=False)
    volume = node.json("volume", "inspect", "full")
    assert volume["in_sync"] == 1, (volume, attached.stderr)
    assert attached.returncode == 0, attached.stderr + node.logs()
    mountpoint = Path(attached.stdout.strip())
    assert sha256_of(mountpoint / "kept") == kept
    node.cli("volume", "detach", "full")


_STORE_ON_A_FULL_DISK = """
import os, sys
from pathlib import Path
from cargohold.errors import NoSpace
from cargohold.stores.diskstore import DiskChunkStore
store = DiskChunkStore(Path(sys.argv[1]))
replica = store.create("ab" * 16, 1 << 30)
replica.write(0, b"a" * 4096, 1)
fd = os.open(Path(sys.argv[1]) / "filler", os.O_WRONLY | os.O_CREAT)
try:  # take every page that is left
    while True:
        os.write(fd, b"f" * 4096)
except OSError:
    os.close(fd)
(Path(sys.argv[1]) / "filler").unlink() if sys.argv[2] == "free" else None
for offset in (32 << 20, 48 << 20):  # checksum and generation pages never touched before
    try:
        replica.write(offset, b"b" * 4096, 2)
        print("written")
    except NoSpace as e:
        print("nospace", e)
replica.fence(3)
assert replica.read(0, 4096) == b"a" * 4096
# a trim of everything: chunk 0 was written, chunks 512 on have a generation page with no
# space under it, and keep generation 0 (the trim needs no room for generations)
replica.trim(0, 1 << 30, 4)
gens = replica.generations()
assert gens[:8] == (4).to_bytes(8, "little") and not any(gens[512 * 8:]), gens[:16]
assert replica.read(0, 4096) == bytes(4096)
print("trimmed")
store.close()
print("ok")
"""


@pytest.mark.parametrize("free", ["full", "free"])
def test_the_chunk_store_on_a_full_disk_says_no_space_instead_of_dying(
        tmp_path: Path, free: str) -> None:
    """Checksums and generations are stored through mmap: a store into a hole on a full
    tmpfs is a SIGBUS. The store gives those pages their space first (NoSpace instead)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        done = subprocess.run([sys.executable, "-c", _STORE_ON_A_FULL_DISK, str(disk), free],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout}{done.stderr}"
    lines = done.stdout.splitlines()
    assert lines[-2:] == ["trimmed", "ok"]
    if free == "full":
        assert all(line.startswith("nospace") for line in lines[:-2]), lines
    else:
        assert lines[:-2] == ["written", "written"]
