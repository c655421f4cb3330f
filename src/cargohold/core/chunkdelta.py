"""A chunk's changed 4 KiB blocks as one body (what a copy between clusters sends when few
blocks of a chunk changed): a bitmap of the chunk's blocks (``BITMAP`` bytes, bit ``i`` of
byte ``i // 8`` for block ``i``), then the bytes of the blocks set, in order.

A *batch* carries the changes of several chunks in one body (one request between clusters
for many chunks): records of a chunk index (u32), a kind (u8: ``HOLE``, ``WHOLE`` or
``DELTA``), a length (u32) and that many bytes (nothing, the chunk's bytes, or its
blocks' body), little-endian, one after the other."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE, runs
from cargohold.errors import InvalidArgument

BLOCKS = CHUNK_SIZE // BLOCK_SIZE
BITMAP = BLOCKS // 8
HOLE, WHOLE, DELTA = 0, 1, 2
#: The most chunks one batch read asks for.
MAX_BATCH = 256
_RECORD = struct.Struct("<IBI")


def encode(blocks: list[int], data: bytes) -> bytes:
    """The body of the chunk's blocks ``blocks`` (sorted, 0 to BLOCKS - 1), ``data`` their
    bytes in that order."""
    if len(data) != len(blocks) * BLOCK_SIZE:
        raise ValueError("the data is not the blocks'")
    bitmap = bytearray(BITMAP)
    for block in blocks:
        bitmap[block // 8] |= 1 << (block % 8)
    return bytes(bitmap) + data


def decode(body: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """(offset in the chunk, bytes) of each run of blocks in ``body``."""
    view = memoryview(body)
    if len(view) < BITMAP:
        raise InvalidArgument(what="blocks", detail="no bitmap")
    bitmap = view[:BITMAP]
    blocks = [i for i in range(BLOCKS) if bitmap[i // 8] >> (i % 8) & 1]
    if not blocks or len(view) != BITMAP + len(blocks) * BLOCK_SIZE:
        raise InvalidArgument(what="blocks", detail=f"{len(view) - BITMAP} bytes for "
                              f"{len(blocks)} blocks")
    at = BITMAP
    for first, count in runs(blocks):
        yield first * BLOCK_SIZE, view[at:at + count * BLOCK_SIZE]
        at += count * BLOCK_SIZE


def collect(blocks: list[int], read: Callable[[int, int], bytes]) -> bytes:
    """The body of the chunk's blocks ``blocks`` (any order, repeats), each run of them read
    with ``read(offset in the chunk, length)``."""
    chosen = sorted(set(blocks))
    if not chosen or chosen[0] < 0 or chosen[-1] >= BLOCKS:
        raise InvalidArgument(what="blocks", detail=f"1 to {BLOCKS} of 0 to {BLOCKS - 1}")
    data = b"".join(read(first * BLOCK_SIZE, count * BLOCK_SIZE)
                    for first, count in runs(chosen))
    return encode(chosen, data)


def encode_batch(records: list[tuple[int, int, bytes]]) -> bytes:
    """A batch of (chunk, kind, payload) records."""
    return b"".join(_RECORD.pack(chunk, kind, len(payload)) + payload
                    for chunk, kind, payload in records)


def decode_batch(body: bytes | memoryview) -> list[tuple[int, int, memoryview]]:
    """The (chunk, kind, payload) records of a batch, checked whole before any is used."""
    view = memoryview(body)
    records = []
    at = 0
    while at < len(view):
        if at + _RECORD.size > len(view):
            raise InvalidArgument(what="batch", detail="a record cut short")
        chunk, kind, length = _RECORD.unpack_from(view, at)
        at += _RECORD.size
        if kind not in (HOLE, WHOLE, DELTA) or at + length > len(view) or \
                kind == HOLE and length or length > CHUNK_SIZE + BITMAP:
            raise InvalidArgument(what="batch", detail=f"a bad record for chunk {chunk}")
        records.append((chunk, kind, view[at:at + length]))
        at += length
    if not records:
        raise InvalidArgument(what="batch", detail="no record")
    return records


def collect_batch(wanted: list[Any], read: Callable[[int, int], bytes]) -> bytes:
    """A batch of ``DELTA`` records of the chunks and blocks ``wanted`` ([[chunk, [block,
    ...]], ...]), each run read with ``read(offset in the volume, length)``."""
    if not wanted or len(wanted) > MAX_BATCH or not all(
            isinstance(w, list) and len(w) == 2 and isinstance(w[0], int) and w[0] >= 0
            and isinstance(w[1], list) and all(isinstance(b, int) for b in w[1])
            for w in wanted):
        raise InvalidArgument(what="blocks", detail=f"1 to {MAX_BATCH} [chunk, [block, ...]]")
    def chunk_reader(chunk: int) -> Callable[[int, int], bytes]:
        return lambda at, n: read(chunk * CHUNK_SIZE + at, n)

    return encode_batch([(chunk, DELTA, collect(blocks, chunk_reader(chunk)))
                         for chunk, blocks in wanted])
