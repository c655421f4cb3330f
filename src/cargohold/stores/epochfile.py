"""A replica's epoch file: the highest fencing epoch it has seen, overwritten in place.

Two slots of (epoch u64, crc32 u32) in sectors of their own, in one block that is written
whole when the replica is made, so that fencing later overwrites allocated space only and
works on a full disk. A fence overwrites the older slot: a crash in the middle leaves the
newer one intact (that fence never returned). Read by the disk store and, without its data
server, by an engine's local reader.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from cargohold.core.layout import BLOCK_SIZE

try:  # the same CRC-32 as zlib's, computed with SIMD instructions
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is optional
    from zlib import crc32

EPOCH_FILE = "epoch"
EPOCH_SLOT = struct.Struct("<QI")
EPOCH_SLOTS = (0, 512)
EPOCH_BYTES = EPOCH_SLOTS[-1] + EPOCH_SLOT.size  # the part of the file the slots use


def epoch_record(epoch: int) -> bytes:
    return EPOCH_SLOT.pack(epoch, crc32(epoch.to_bytes(8, "little")))


def make_epoch_file(path: Path, epoch: int) -> None:
    """Write ``path`` whole (every byte allocated), both slots holding ``epoch``."""
    block = bytearray(BLOCK_SIZE)
    for at in EPOCH_SLOTS:
        EPOCH_SLOT.pack_into(block, at, *EPOCH_SLOT.unpack(epoch_record(epoch)))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, block, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_epoch_slots(data: bytes) -> list[int | None]:
    """Each slot's epoch, or None where its checksum fails (a torn write)."""
    found: list[int | None] = []
    for at in EPOCH_SLOTS:
        if len(data) < at + EPOCH_SLOT.size:
            found.append(None)
            continue
        epoch, crc = EPOCH_SLOT.unpack_from(data, at)
        found.append(epoch if crc == crc32(epoch.to_bytes(8, "little")) else None)
    return found


