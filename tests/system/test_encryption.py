"""Volumes encrypted at rest, on real nodes: the data servers' files hold no plaintext, the
file system reads back after a reattach and on another node, a key of one's own works, and
what cannot be encrypted is refused without leaving anything behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Node, credentials, leftovers, needs_root

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20
MARK = b"cargohold-plaintext-marker-" * 4  # 108 bytes no ciphertext will contain


def _write_marks(path: Path, mib: int) -> bytes:
    block = (MARK * (4096 // len(MARK) + 1))[:4096]
    data = block * 256 * mib
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def _replica_files_hold(node: Node, needle: bytes) -> bool:
    for disk in node.data_dirs:
        for path in disk.rglob("*"):
            if path.is_file() and path.stat().st_size:
                with open(path, "rb") as f:
                    while chunk := f.read(8 * MIB):
                        if needle in chunk:
                            return True
    return False


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    """Two nodes on one metadata store (one CA and cluster key), one data server each."""
    meta = f"sqlite://{tmp_path / 'meta.db'}"
    nodes: list[Node] = []
    try:
        for name in ("e1", "e2"):
            (tmp_path / name).mkdir()
            nodes.append(Node(tmp_path / name, data_servers=1, name=name,
                              extra=("--metadata", meta, *credentials(tmp_path, name))))
            nodes[-1].start()
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            node.cleanup()


def test_an_encrypted_volume_leaves_no_plaintext_on_its_replicas(
        pair: tuple[Node, Node], tmp_path: Path) -> None:
    first, second = pair
    first.cli("volume", "create", "secret", "--size", "256M", "--replicas", "2", "--encrypt")
    first.cli("volume", "create", "plain", "--size", "256M", "--replicas", "2")
    assert first.json("volume", "inspect", "secret")["encryption"] == \
        "aes-256-xts-plain64/4096"  # type: ignore[index]
    for name in ("secret", "plain"):
        mountpoint = Path(first.cli("volume", "attach", name).stdout.strip())
        data = _write_marks(mountpoint / "data.bin", 8)
        first.cli("volume", "detach", name)
        # the marker on disk: in the plain volume's replicas only (the check can see it)
    assert _replica_files_hold(first, MARK) or _replica_files_hold(second, MARK)
    first.cli("volume", "rm", "plain")
    assert not _replica_files_hold(first, MARK) and not _replica_files_hold(second, MARK)
    # the key is the cluster's: the volume opens on another node too
    mountpoint = Path(second.cli("volume", "attach", "secret").stdout.strip())
    assert (mountpoint / "data.bin").read_bytes() == data
    second.cli("volume", "detach", "secret")
    keyless = second.cli("volume", "inspect", "secret", "-o", "json").stdout
    assert "key" not in keyless.replace('"encryption"', "")  # no key material shown


def test_a_key_of_ones_own_and_bad_keys(tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=2)
    try:
        node.start()
        key = tmp_path / "volume.key"
        key.write_bytes(os.urandom(64))
        node.cli("volume", "create", "mine", "--size", "128M", "--key-file", str(key))
        mountpoint = Path(node.cli("volume", "attach", "mine").stdout.strip())
        (mountpoint / "f").write_bytes(b"hello")
        node.cli("volume", "detach", "mine")
        mountpoint = Path(node.cli("volume", "attach", "mine").stdout.strip())
        assert (mountpoint / "f").read_bytes() == b"hello"
        node.cli("volume", "detach", "mine")
        bad = tmp_path / "bad.key"
        bad.write_bytes(b"\1" * 64)  # both halves equal: XTS refuses it
        done = node.cli("volume", "create", "nope", "--size", "128M", "--key-file", str(bad),
                        check=False)
        assert done.returncode == 2 and "volume key" in done.stderr
        assert str(b"\1".hex()) not in done.stderr
        assert [v["name"] for v in node.json("volume", "ls")] == ["mine"]  # type: ignore[index]
    finally:
        node.cleanup()
    assert leftovers(tmp_path) == {"mounts": [], "loops": [], "processes": []}


def test_a_plaintext_node_refuses_to_encrypt(tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=1, extra=("--insecure-plaintext",))
    try:
        node.start()
        done = node.cli("volume", "create", "x", "--size", "64M", "--replicas", "1",
                        "--encrypt", check=False)
        assert done.returncode == 2 and "needs the cluster key" in done.stderr
        assert node.json("volume", "ls") == []
    finally:
        node.cleanup()
