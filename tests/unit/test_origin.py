"""A clone's engine while it fills (``OriginTarget``), over a fake replica set and source."""

from __future__ import annotations

import asyncio
import os
from array import array
from types import SimpleNamespace
from typing import Any

from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.models import Origin
from cargohold.errors import SnapshotFailed
from cargohold.services.engine.origin import OriginTarget

SIZE = 4 * CHUNK_SIZE


class FakeReplicas:
    """The replica set: one image, a generation per chunk, and what was asked of it."""

    def __init__(self) -> None:
        self.image = bytearray(SIZE)
        self.gens = [0] * 4
        self.calls: list[tuple[str, int, int]] = []
        self.name, self.volume_id, self.size = "clone", "c" * 32, SIZE
        self.members = [SimpleNamespace(client=self)]
        self.joining: list[Any] = []

    async def generations(self, _vid: str) -> bytes:
        return array("Q", self.gens).tobytes()

    def read_at_once(self, offset: int, length: int, into: memoryview | None = None) -> bytes:
        return bytes(self.image[offset:offset + length])

    async def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", offset, length))
        await asyncio.sleep(0)
        return bytes(self.image[offset:offset + length])

    def start_read(self, offset: int, length: int) -> asyncio.Future[bytes]:
        return asyncio.ensure_future(self.read(offset, length))

    async def write(self, offset: int, data: Any) -> None:
        self.calls.append(("write", offset, len(data)))
        await asyncio.sleep(0)
        self.image[offset:offset + len(data)] = data
        for c in range(offset // CHUNK_SIZE, (offset + len(data) - 1) // CHUNK_SIZE + 1):
            self.gens[c] = 9

    def start_write(self, offset: int, data: Any, shared_at: int = -1) -> asyncio.Future[None]:
        return asyncio.ensure_future(self.write(offset, data))

    async def trim(self, offset: int, length: int) -> None:
        self.calls.append(("trim", offset, length))
        self.image[offset:offset + length] = bytes(length)

    async def flush(self) -> None:
        self.calls.append(("flush", 0, 0))


class FakeSource:
    catalog = None

    def __init__(self) -> None:
        self.data = os.urandom(3 * CHUNK_SIZE)  # the snapshot: smaller than the clone
        self.origin = Origin(volume="src", volume_id="s" * 32, snapshot="snap",
                             snapshot_id="a" * 32, size=len(self.data))
        self.reads: list[tuple[int, int]] = []
        self.closed = False
        self.broken = False

    async def read(self, offset: int, length: int) -> bytes:
        if self.broken:
            raise SnapshotFailed(name="src@snap", detail="gone")
        self.reads.append((offset, length))
        await asyncio.sleep(0)
        return self.data[offset:offset + length]

    async def close(self) -> None:
        self.closed = True


def _target(absent: set[int]) -> tuple[OriginTarget, FakeReplicas, FakeSource]:
    inner, source = FakeReplicas(), FakeSource()
    return OriginTarget(inner, source, set(absent)), inner, source  # type: ignore[arg-type]


def test_absent_chunks_read_from_the_source_present_ones_from_the_replicas() -> None:
    target, inner, source = _target({0, 2})
    inner.image[CHUNK_SIZE:2 * CHUNK_SIZE] = b"r" * CHUNK_SIZE
    assert target.read_at_once(0, 4096) is None  # absent: never from the local files
    assert target.read_at_once(CHUNK_SIZE, 4096) == b"r" * 4096

    async def run() -> None:
        whole = await target.start_read(CHUNK_SIZE - 4096, 3 * CHUNK_SIZE)  # over 3 chunks
        assert whole == (source.data[CHUNK_SIZE - 4096:CHUNK_SIZE] + b"r" * CHUNK_SIZE
                         + source.data[2 * CHUNK_SIZE:3 * CHUNK_SIZE]
                         + bytes(CHUNK_SIZE - 4096))

    asyncio.run(run())
    assert source.reads == [(CHUNK_SIZE - 4096, 4096), (2 * CHUNK_SIZE, CHUNK_SIZE)]


def test_the_first_write_to_an_absent_chunk_copies_it_in_with_the_write_once() -> None:
    target, inner, source = _target({0, 1})

    async def run() -> None:
        # two writes to one absent chunk at once: one copy, both writes kept
        await asyncio.gather(target.start_write(4096, b"a" * 4096),
                             target.start_write(8192, b"b" * 4096))
        # a write of the whole chunk needs nothing from the source
        await target.start_write(CHUNK_SIZE, b"c" * CHUNK_SIZE)

    asyncio.run(run())
    expected = bytearray(source.data[:CHUNK_SIZE])
    expected[4096:12288] = b"a" * 4096 + b"b" * 4096
    assert inner.image[:CHUNK_SIZE] == expected
    assert inner.image[CHUNK_SIZE:2 * CHUNK_SIZE] == b"c" * CHUNK_SIZE
    assert source.reads == [(0, CHUNK_SIZE)]
    assert target.absent == set()
    assert [c for c in inner.calls if c[0] == "write"] == [
        ("write", 0, CHUNK_SIZE), ("write", 8192, 4096), ("write", CHUNK_SIZE, CHUNK_SIZE)]


def test_a_trim_of_an_absent_chunk_leaves_the_rest_of_it_as_the_source_has_it() -> None:
    target, inner, source = _target({2})
    asyncio.run(target.trim(2 * CHUNK_SIZE + 4096, 8192))
    expected = bytearray(source.data[2 * CHUNK_SIZE:3 * CHUNK_SIZE])
    expected[4096:12288] = bytes(8192)
    assert inner.image[2 * CHUNK_SIZE:3 * CHUNK_SIZE] == expected
    assert target.absent == set()


def test_chunks_the_controller_filled_are_dropped_and_then_the_source_let_go() -> None:
    target, inner, source = _target({0, 2})

    async def run() -> None:
        inner.gens[0] = 1  # filled (FILL's generation)
        await target.refresh()
        assert target.absent == {2} and not source.closed
        inner.gens[2] = 1
        await target.refresh()
        assert target.absent == set() and source.closed
        # everything passes straight through now
        inner.image[:4096] = b"f" * 4096
        assert await target.start_read(0, 4096) == b"f" * 4096

    asyncio.run(run())


def test_a_source_gone_after_the_fill_is_no_error_but_one_before_is() -> None:
    target, inner, source = _target({0, 1})
    source.broken = True
    inner.gens[0] = 1  # chunk 0 filled (its snapshot may be gone), chunk 1 not yet
    inner.image[:4096] = b"f" * 4096

    async def run() -> None:
        assert await target.start_read(0, 4096) == b"f" * 4096
        try:
            await target.start_read(CHUNK_SIZE, 4096)
        except SnapshotFailed:
            return
        raise AssertionError("a chunk only the source holds read as something")

    asyncio.run(run())
    assert target.absent == {1}


def test_a_replica_that_joins_lacking_filled_chunks_is_not_read_for_them() -> None:
    target, inner, source = _target({2})
    newcomer = FakeReplicas()
    newcomer.gens = [9, 0, 0, 0]  # caught up: chunk 0 (ours), not chunk 1 (filled later)
    inner.joining = [SimpleNamespace(server=SimpleNamespace(id="s9"), client=newcomer)]
    target.held = {0, 1, 2}

    async def run() -> None:
        await target.joining("s9")
        assert target.absent == {1, 2}
        assert await target.start_read(CHUNK_SIZE, 4096) == source.data[CHUNK_SIZE:
                                                                          CHUNK_SIZE + 4096]
        await target.joining("unknown")  # not joining: nothing changes

    asyncio.run(run())
    assert target.absent == {1, 2}
