"""A data server's space reserve on a disk that really fills up (a 96 MiB tmpfs): new
chunks are refused once free space is down to the reserve, writes into chunks in use go on,
and freeing space lets new chunks in again."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cargohold.core.layout import CHUNK_SIZE
from cargohold.errors import NoSpace
from cargohold.stores.diskstore import DiskChunkStore
from tests.conftest import needs_root

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_the_reserve_keeps_room_for_chunks_in_use(small_disk: Path) -> None:
    store = DiskChunkStore(small_disk, reserve=32 * MIB)
    try:
        volume = uuid.uuid4().hex
        replica = store.create(volume, 256 * MIB)  # thin: far more than the disk
        replica.write(0, b"j" * CHUNK_SIZE, 1)  # a chunk in use (say, a journal)
        written = 1
        with pytest.raises(NoSpace, match="reserve of 32 MiB"):
            for chunk in range(1, 256):
                replica.write(chunk * CHUNK_SIZE, b"d" * CHUNK_SIZE, 2)
                written += 1
        # refused before the disk was full: at most a check's worth past the reserve
        free = store.free()
        assert 32 * MIB - 17 * MIB <= free <= 32 * MIB + CHUNK_SIZE, free
        for _ in range(8):  # the chunk in use takes writes, again and again
            replica.write(0, b"J" * CHUNK_SIZE, 3)
        assert bytes(replica.read(0, 4096)) == b"J" * 4096
        replica.trim(CHUNK_SIZE, (written - 1) * CHUNK_SIZE, 4)  # fstrim frees space
        store.refresh_space()
        replica.write(200 * CHUNK_SIZE, b"n" * CHUNK_SIZE, 5)
    finally:
        store.close()
