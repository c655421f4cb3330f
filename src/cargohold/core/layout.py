"""How a volume's bytes map onto chunks and checksum blocks.

A volume is a sparse array of ``CHUNK_SIZE`` chunks. Each chunk copy on a data server carries
a generation number (the newest write that touched it); each ``BLOCK_SIZE`` block inside it
carries a CRC32 checksum. The loop device runs with 4 KiB sectors, so every I/O the engine
sees is block aligned.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

BLOCK_SIZE = 4096
CHUNK_SIZE = 1 << 20
BLOCKS_PER_CHUNK = CHUNK_SIZE // BLOCK_SIZE


class Extent(NamedTuple):
    """A piece of an I/O that lies inside one chunk."""

    chunk: int  # chunk index in the volume
    offset: int  # byte offset in the volume
    length: int  # bytes
    buffer_offset: int  # where this piece starts in the caller's buffer


def split(offset: int, length: int) -> Iterator[Extent]:
    """Split the byte range ``[offset, offset+length)`` at chunk boundaries."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    done = 0
    while done < length:
        pos = offset + done
        chunk = pos // CHUNK_SIZE
        piece = min(length - done, (chunk + 1) * CHUNK_SIZE - pos)
        yield Extent(chunk, pos, piece, done)
        done += piece


def is_aligned(offset: int, length: int) -> bool:
    return offset % BLOCK_SIZE == 0 and length % BLOCK_SIZE == 0


def blocks(offset: int, length: int) -> range:
    """Indexes of the checksum blocks covered by an aligned byte range."""
    return range(offset // BLOCK_SIZE, (offset + length) // BLOCK_SIZE)


def chunks(offset: int, length: int) -> range:
    """Indexes of the chunks touched by a byte range."""
    if length == 0:
        return range(0)
    return range(offset // CHUNK_SIZE, (offset + length - 1) // CHUNK_SIZE + 1)


def data_runs(view: memoryview) -> list[tuple[int, int]]:
    """(offset, length) of the runs of whole blocks in ``view`` that are not all zeros."""
    found: list[tuple[int, int]] = []
    zero = bytes(BLOCK_SIZE)
    start = -1
    for at in range(0, len(view), BLOCK_SIZE):
        empty = view[at:at + BLOCK_SIZE] == zero
        if not empty and start < 0:
            start = at
        elif empty and start >= 0:
            found.append((start, at - start))
            start = -1
    if start >= 0:
        found.append((start, len(view) - start))
    return found


def chunk_count(size: int) -> int:
    return -(-size // CHUNK_SIZE)


def generation_table(raw: bytes) -> array[int]:
    """A data server's GENS answer (little-endian u64 per chunk) as an array."""
    table = array("Q", raw)
    if sys.byteorder == "big":
        table.byteswap()
    return table


def copy_plan(size: int, sources: Mapping[str, array[int]], targets: Mapping[str, array[int]],
              ) -> list[tuple[int, str, int, list[str]]]:
    """What a copy must do to bring ``targets`` level with ``sources`` (generation tables by
    data server id): (chunk, the source holding its newest generation, that generation, the
    targets whose generation differs) for every chunk some target lacks. Chunks no source
    ever wrote are thin: nothing to copy. Sources that agree take turns (chunk by chunk), so a
    copy reads from all of them."""
    plan = []
    for chunk in range(chunk_count(size)):
        gens = {sid: table[chunk] if chunk < len(table) else 0 for sid, table in sources.items()}
        newest = max(gens.values(), default=0)
        if not newest:
            continue
        holders = [sid for sid, gen in gens.items() if gen == newest]
        source = holders[chunk % len(holders)]
        stale = [t for t, table in targets.items()
                 if (table[chunk] if chunk < len(table) else 0) != newest]
        if stale:
            plan.append((chunk, source, newest, stale))
    return plan


def runs(numbers: Iterable[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in a sorted sequence."""
    first, count = 0, 0
    for n in numbers:
        if count and n == first + count:
            count += 1
            continue
        if count:
            yield first, count
        first, count = n, 1
    if count:
        yield first, count
