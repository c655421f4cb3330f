"""Growing volumes through the CLI against a real node, and RESIZE on a real data server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cargohold.adapters.dataserver import serve
from cargohold.clients.dataclient import DataClient
from cargohold.errors import InvalidArgument, ReplicaNotFound
from cargohold.stores.diskstore import DiskChunkStore
from tests.conftest import Node

MIB = 1 << 20
GIB = 1 << 30


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("resize"))
    try:
        n.start()
        yield n
    finally:
        n.cleanup()


def _replica_sizes(node: Node, volume_id: str) -> list[int]:
    sizes = []
    for d in node.data_dirs:
        meta = d / "replicas" / volume_id / "meta.json"
        if meta.exists():
            sizes.append(json.loads(meta.read_text())["size"])
    return sizes


def test_grow_a_detached_volume(node: Node) -> None:
    node.cli("volume", "create", "grow", "--size", "1G", "--replicas", "3")
    assert node.cli("volume", "resize", "grow", "--size", "2G").stdout.strip() == "grow 2G"
    inspected = node.json("volume", "inspect", "grow")
    assert isinstance(inspected, dict)
    assert inspected["size"] == 2 * GIB and inspected["state"] == "detached"
    assert _replica_sizes(node, inspected["id"]) == [2 * GIB] * 3  # every replica grew
    assert inspected["used"] == 0  # still thin

    grown = node.json("volume", "resize", "grow", "--size", "3000M")  # rounded to whole MiB
    assert isinstance(grown, dict) and grown["size"] == 3000 * MIB
    same = node.json("volume", "resize", "grow", "--size", str(3000 * MIB))  # a no-op
    assert isinstance(same, dict) and same["size"] == 3000 * MIB
    assert _replica_sizes(node, inspected["id"]) == [3000 * MIB] * 3
    listing = node.cli("volume", "ls").stdout
    assert "2.9G" in listing
    node.cli("volume", "rm", "grow")


def test_shrinking_is_refused_and_changes_nothing(node: Node) -> None:
    node.cli("volume", "create", "keep", "--size", "1G")
    volume_id = node.json("volume", "inspect", "keep")["id"]  # type: ignore[index]
    done = node.cli("volume", "resize", "keep", "--size", "512M", check=False)
    assert done.returncode == 2, done.stderr
    assert "Volume 'keep' is 1G; it cannot shrink to 512M. Volumes only grow" in done.stderr
    assert "[shrink_refused]" in done.stderr
    assert node.json("volume", "inspect", "keep")["size"] == GIB  # type: ignore[index]
    assert _replica_sizes(node, volume_id) == [GIB] * 2


@pytest.mark.parametrize("args,code,message", [
    (["--size", "0"], 2, "greater than zero"),
    (["--size=-1G"], 2, "Invalid size"),
    (["--size", "abc"], 2, "Invalid size"),
    (["--size", "1E"], 2, "unknown unit"),
    (["--size", "65T"], 2, "the largest volume is 64T"),
    (["--size", "1M"], 2, "the smallest volume is 16M"),
    (["--size", "32M"], 2, "cannot shrink to 32M"),
])
def test_bad_sizes_are_refused_and_change_nothing(shared_node: Node, args: list[str], code: int,
                                                 message: str) -> None:
    node = shared_node
    if not any(v["name"] == "fixed" for v in node.json("volume", "ls")):  # type: ignore[union-attr]
        node.cli("volume", "create", "fixed", "--size", "64M")
    before = node.json("volume", "inspect", "fixed")
    assert isinstance(before, dict)
    done = node.cli("volume", "resize", "fixed", *args, check=False)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    after = node.json("volume", "inspect", "fixed")
    assert isinstance(after, dict) and after["size"] == before["size"] == 64 * MIB
    assert _replica_sizes(node, before["id"]) == [64 * MIB] * 2


def test_resize_of_an_unknown_volume_is_not_found(shared_node: Node) -> None:
    done = shared_node.cli("volume", "resize", "nosuch", "--size", "1G", check=False)
    assert done.returncode == 3 and "does not exist" in done.stderr


def test_resize_needs_a_size(shared_node: Node) -> None:
    done = shared_node.cli("volume", "resize", "fixed", check=False)
    assert done.returncode == 2 and "--size" in done.stderr


def test_resize_with_a_data_server_down_keeps_the_old_size(node: Node) -> None:
    node.cli("volume", "create", "half", "--size", "64M", "--replicas", "3")
    volume = node.json("volume", "inspect", "half")
    assert isinstance(volume, dict)
    node.stop()  # data servers stop with the node; start the node with one disk missing
    holder = Path(volume["replicas"][2]["path"])
    moved = holder.with_name(holder.name + ".away")
    holder.rename(moved)
    partial = Node(node.base, data_servers=0)
    partial.data_dirs = [d for d in node.data_dirs if d != holder]
    try:
        partial.start()
        done = partial.cli("volume", "resize", "half", "--size", "128M", check=False)
        assert done.returncode == 5, done.stderr  # the third replica's server is unavailable
        assert partial.json("volume", "inspect", "half")["size"] == 64 * MIB  # type: ignore
    finally:
        partial.cleanup()
        moved.rename(holder)
    node.start()
    node.cli("volume", "resize", "half", "--size", "128M")  # all replicas answer again
    assert _replica_sizes(node, volume["id"]) == [128 * MIB] * 3


def test_resize_op_on_a_real_data_server(tmp_path: Path) -> None:
    async def main() -> None:
        store = DiskChunkStore(tmp_path)
        server = await serve(store, "127.0.0.1", 0)
        client = DataClient(server.address)
        try:
            await client.connect()
            v = uuid.uuid4().hex
            await client.create(v, 16 * MIB)
            await client.write(v, 1, 0, b"z" * 4096, 1)
            assert await client.resize(v, 32 * MIB) == 32 * MIB
            assert await client.resize(v, 16 * MIB) == 32 * MIB  # never shrinks
            assert (await client.stat(v))["size"] == 32 * MIB
            await client.write(v, 1, 31 * MIB, b"w" * 4096, 2)
            assert await client.read(v, 1, 31 * MIB, 4096) == b"w" * 4096
            assert await client.read(v, 1, 0, 4096) == b"z" * 4096
            assert (await client.hello())["provisioned"] == 32 * MIB
            with pytest.raises(InvalidArgument, match="size"):
                await client.resize(v, 5000)
            with pytest.raises(ReplicaNotFound):
                await client.resize(uuid.uuid4().hex, 32 * MIB)
        finally:
            await client.close()
            await server.close()
            store.close()

    asyncio.run(main())
