"""Growing volumes below the service layer: replicas (memory and disk), the wire op, the
engine's replica set and the FUSE size announcement."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cargohold.core import wire
from cargohold.core.layout import BLOCK_SIZE
from cargohold.core.models import DataServer, Replica, Volume
from cargohold.errors import DataServerUnavailable, InvalidArgument, ReplicaNotFound
from cargohold.services.engine import fuse
from cargohold.services.engine.replicaset import Member, ReplicaSet
from cargohold.stores.chunkstore import ChunkStore, MemoryChunkStore
from cargohold.stores.diskstore import DiskChunkStore

MIB = 1 << 20


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    made: ChunkStore = MemoryChunkStore() if request.param == "memory" else DiskChunkStore(tmp_path)
    yield made
    made.close()


def _gens(raw: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw))


def test_grow_keeps_data_and_the_new_range_is_thin_zeros(store: ChunkStore) -> None:
    v = uuid.uuid4().hex
    replica = store.create(v, 16 * MIB)
    replica.write(16 * MIB - BLOCK_SIZE, b"a" * BLOCK_SIZE, 7)
    used = replica.info().used
    assert store.grow(v, 48 * MIB) == 48 * MIB
    replica = store.replica(v)
    assert replica.size == 48 * MIB and store.provisioned() == 48 * MIB
    assert replica.read(16 * MIB - BLOCK_SIZE, BLOCK_SIZE) == b"a" * BLOCK_SIZE
    assert replica.read(16 * MIB, 2 * BLOCK_SIZE) == bytes(2 * BLOCK_SIZE)
    assert replica.info().used == used  # thin: growing costs nothing
    gens = _gens(replica.generations())
    assert len(gens) == 48 and gens[15] == 7 and not any(gens[16:])
    replica.write(40 * MIB, b"b" * BLOCK_SIZE, 9)  # beyond the old end
    assert replica.read(40 * MIB, BLOCK_SIZE) == b"b" * BLOCK_SIZE
    assert _gens(replica.generations())[40] == 9
    replica.flush()
    with pytest.raises(InvalidArgument, match="beyond"):
        replica.read(48 * MIB, BLOCK_SIZE)


def test_grow_never_shrinks_and_is_idempotent(store: ChunkStore) -> None:
    v = uuid.uuid4().hex
    store.create(v, 32 * MIB)
    assert store.grow(v, 32 * MIB) == 32 * MIB
    assert store.grow(v, 16 * MIB) == 32 * MIB  # already bigger: left as it is
    assert store.replica(v).size == 32 * MIB
    for bad in (0, -4096, 4097):
        with pytest.raises(InvalidArgument, match="size"):
            store.grow(v, bad)
    with pytest.raises(ReplicaNotFound):
        store.grow(uuid.uuid4().hex, 64 * MIB)


def test_grown_disk_replica_survives_reopen(tmp_path: Path) -> None:
    v = uuid.uuid4().hex
    store = DiskChunkStore(tmp_path)
    replica = store.create(v, 16 * MIB)
    replica.fence(5)
    replica.write(0, b"x" * BLOCK_SIZE, 1)
    store.grow(v, 64 * MIB)
    store.replica(v).write(63 * MIB, b"y" * BLOCK_SIZE, 2)
    store.replica(v).flush()
    store.close()
    store = DiskChunkStore(tmp_path)
    try:
        replica = store.replica(v)
        assert replica.size == 64 * MIB and replica.epoch == 5
        assert replica.read(0, BLOCK_SIZE) == b"x" * BLOCK_SIZE
        assert replica.read(63 * MIB, BLOCK_SIZE) == b"y" * BLOCK_SIZE
        assert store.provisioned() == 64 * MIB
        meta = json.loads((tmp_path / "replicas" / v / "meta.json").read_text())
        assert meta == {"volume_id": v, "size": 64 * MIB, "epoch": 5}
    finally:
        store.close()


def test_a_grow_that_crashed_before_meta_json_is_cut_back(tmp_path: Path) -> None:
    v = uuid.uuid4().hex
    store = DiskChunkStore(tmp_path)
    store.create(v, 16 * MIB).write(0, b"x" * BLOCK_SIZE, 1)
    store.close()
    path = tmp_path / "replicas" / v  # files lengthened, meta.json still says 16 MiB
    for name, length in (("data", 32 * MIB), ("sums", 32 * MIB // BLOCK_SIZE * 4),
                         ("gens", 32 * 8)):
        os.truncate(path / name, length)
    store = DiskChunkStore(tmp_path)
    try:
        replica = store.replica(v)
        assert replica.size == 16 * MIB and replica.read(0, BLOCK_SIZE) == b"x" * BLOCK_SIZE
        assert (path / "sums").stat().st_size == 16 * MIB // BLOCK_SIZE * 4
        assert store.grow(v, 32 * MIB) == 32 * MIB  # and it can grow again
        assert replica.read(16 * MIB, BLOCK_SIZE) == bytes(BLOCK_SIZE)
    finally:
        store.close()


def test_resize_op_is_on_the_wire() -> None:
    frame = wire.encode_request(wire.Op.RESIZE, 3, "ab" * 16, payload=b'{"size":4096}')
    header, payload = wire.decode_request(frame)
    assert header.op == wire.Op.RESIZE == 11 and payload == b'{"size":4096}'


# --- the engine's side --------------------------------------------------------------------


class StatClient:
    def __init__(self, size: int | Exception) -> None:
        self.size = size

    async def stat(self, _vid: str, *, timeout: float | None = None) -> dict[str, Any]:
        if isinstance(self.size, Exception):
            raise self.size
        return {"size": self.size}

    async def close(self) -> None:
        pass


def _replica_set(*sizes: int | Exception) -> ReplicaSet:
    servers = {f"s{i}": DataServer(id=f"s{i}", node="n", address="-", path="-")
               for i in range(len(sizes))}
    volume = Volume(id="v" * 32, name="vol", size=16 * MIB, replica_count=len(sizes),
                    fs="ext4", replicas=[Replica(server=s) for s in servers])

    async def mark(server_id: str, reason: str) -> None:
        raise AssertionError("growing must never mark a replica out of sync")

    rs = ReplicaSet(volume, servers, epoch=1, local_node="n", mark_failed=mark)
    rs.members = [Member(servers[f"s{i}"], StatClient(s))  # type: ignore[arg-type]
                  for i, s in enumerate(sizes)]
    return rs


def test_replica_set_grows_only_when_every_replica_is_that_big() -> None:
    rs = _replica_set(64 * MIB, 64 * MIB)
    assert asyncio.run(rs.grow(64 * MIB)) and rs.size == 64 * MIB
    assert asyncio.run(rs.grow(64 * MIB))  # the same size again: fine
    assert not asyncio.run(rs.grow(32 * MIB)) and rs.size == 64 * MIB  # never shrinks
    rs = _replica_set(64 * MIB, 32 * MIB)
    assert not asyncio.run(rs.grow(64 * MIB)) and rs.size == 16 * MIB
    unreachable = DataServerUnavailable(server="s1", address="-", detail="gone")
    rs = _replica_set(64 * MIB, unreachable)
    assert not asyncio.run(rs.grow(64 * MIB)) and rs.size == 16 * MIB
    assert len(rs.members) == 2


def test_fuse_session_announces_a_new_size_with_inval_inode() -> None:
    class Target:
        size = 16 * MIB

    session = fuse.FuseSession(Target(), "/nowhere")  # type: ignore[arg-type]
    session.resized()  # not mounted: nothing to tell
    read, write = os.pipe()
    try:
        session.fd = write
        session.resized()
        raw = os.read(read, 4096)
    finally:
        session.fd = -1
        os.close(read)
        os.close(write)
    length, code, unique = fuse.OUT_HEADER.unpack_from(raw)
    assert (length, code, unique) == (len(raw), fuse.NOTIFY_INVAL_INODE, 0)
    ino, offset, size = fuse.NOTIFY_INVAL_INODE_OUT.unpack_from(raw, fuse.OUT_HEADER.size)
    assert (ino, offset, size) == (fuse.FILE_INO, -1, 0)  # attributes only
