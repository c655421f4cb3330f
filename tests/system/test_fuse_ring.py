"""Real engines on FUSE over io_uring (the kernel's ``fuse.enable_uring`` switched on for the
test): volumes attached, written, resized, detached and attached again, with their data.
The session on both transports with a memory target: tests/integration/test_fuse_transport.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cargohold.services.engine import fuse
from tests.conftest import Node, leftovers, needs_root
from tests.conftest import sha256_of as _sha256
from tests.conftest import write_random as _write_random

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20
URING = Path(fuse.URING_PARAMETER)


@pytest.fixture
def uring() -> Iterator[None]:
    os.close(os.open("/dev/fuse", os.O_RDWR))  # loads the fuse module, if it is one
    if not URING.exists():
        pytest.skip("this kernel has no FUSE over io_uring")
    if fuse._fusering is None or os.environ.get("CARGOHOLD_COMPILED") == "0":
        pytest.skip("the ring is not built, or CARGOHOLD_COMPILED=0")
    before = URING.read_text().strip()
    URING.write_text("1")
    try:
        yield
    finally:
        URING.write_text("1" if before == "Y" else "0")


def engine_log(node: Node) -> str:
    return "".join(p.read_text(errors="replace")
                   for p in node.state.glob("engines/*/engine.log"))


def test_a_volume_on_the_ring_keeps_its_data_across_detach_resize_and_reattach(
        uring: None, node: Node) -> None:
    node.cli("volume", "create", "ringed", "--size", "256M", "--replicas", "2")
    mountpoint = Path(node.cli("volume", "attach", "ringed").stdout.strip())
    assert engine_log(node).count("FUSE requests through io_uring") == 1
    big = _write_random(mountpoint / "big.bin", 40 * MIB)  # 1 MiB requests
    small = mountpoint / "small.bin"
    with open(small, "wb") as f:  # 4 KiB requests, each synced
        for _ in range(64):
            f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
    small_digest = _sha256(small)
    subprocess.run(["sync", "-f", str(mountpoint)], check=True)
    # the grown size reaches the kernel through /dev/fuse (FUSE_NOTIFY_INVAL_INODE) while
    # requests come through the ring (ext4 itself grows only with CAP_SYS_RESOURCE)
    grown = node.cli("volume", "resize", "ringed", "--size", "512M", check=False)
    assert grown.returncode == 0 or "CAP_SYS_RESOURCE" in grown.stderr, grown.stderr
    device = node.json("volume", "inspect", "ringed")["attachment"]["device"]  # type: ignore[index]
    assert subprocess.run(["blockdev", "--getsize64", device], capture_output=True, text=True,
                          check=True).stdout.strip() == str(512 * MIB)
    assert _sha256(mountpoint / "small.bin") == small_digest
    node.cli("volume", "detach", "ringed")
    mountpoint = Path(node.cli("volume", "attach", "ringed").stdout.strip())
    assert engine_log(node).count("FUSE requests through io_uring") == 2
    assert _sha256(mountpoint / "big.bin") == big
    assert _sha256(mountpoint / "small.bin") == small_digest
    node.cli("volume", "detach", "ringed")
    assert "refused" not in engine_log(node)
    left = leftovers(node.base)
    assert not left["loops"] and not left["mounts"], left
