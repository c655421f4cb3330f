"""A replica's epoch file: the highest fencing epoch it has seen, overwritten in place.

Two slots of (epoch u64, crc32 u32) in sectors of their own, in one block that is written
whole when the replica is made, so that fencing later overwrites allocated space only and
works on a full disk. A fence overwrites the older slot: a crash in the middle leaves the
newer one intact (that fence never returned). Read by the disk store and, without its data
server, by an engine's local reader.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
from pathlib import Path

from cargohold.core.layout import BLOCK_SIZE
from cargohold.stores.sparsefile import fsync_dir

try:  # the same CRC-32 as zlib's, computed with SIMD instructions
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is optional
    from zlib import crc32

log = logging.getLogger(__name__)

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




def open_epoch_file(replica: Path, epoch: int, volume_id: str) -> tuple[int, int]:
    """Open the epoch file of the replica directory ``replica`` (made for replicas older
    than it, holding ``epoch``): its fd and the highest of ``epoch`` and its slots. The fd
    is -1 when it cannot be made (the disk is full): fences then replace meta.json, which
    needs free space."""
    path = replica / EPOCH_FILE
    if not path.exists():
        tmp = path.with_name(f".{EPOCH_FILE}.{secrets.token_hex(4)}.tmp")
        try:
            make_epoch_file(tmp, epoch)
            os.rename(tmp, path)
            fsync_dir(replica)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("replica %s: cannot make its epoch file (%s); fencing needs free "
                        "space until it exists", volume_id, exc)
            return -1, epoch
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    slots = read_epoch_slots(os.pread(fd, BLOCK_SIZE, 0))
    return fd, max([epoch, *(e for e in slots if e is not None)])


def overwrite_epoch(fd: int, epoch: int) -> None:
    """Store ``epoch`` durably over a torn slot, else the older one: the newest stays whole."""
    slots = read_epoch_slots(os.pread(fd, BLOCK_SIZE, 0))
    ranks = [-1 if e is None else e for e in slots]
    older = ranks.index(min(ranks))
    os.pwrite(fd, epoch_record(epoch), EPOCH_SLOTS[older])
    os.fdatasync(fd)
