"""Removing a node (``node rm``) on the in-memory store: what it refuses, what it removes."""

from __future__ import annotations

import asyncio

import pytest

from cargohold.core.models import DataServer, Node, Replica, ReplicaState, Volume, liveness_key
from cargohold.errors import LastCopy, NodeAlive, NodeHoldsReplicas, NodeNotFound
from cargohold.services.nodes import NodeRemoval
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore


async def _cluster() -> tuple[MemoryStore, Catalog]:
    store = MemoryStore()
    catalog = Catalog(store)
    for name in ("a", "b", "c"):
        await catalog.put_node(Node(name=name, data_servers=[f"s{name}"]))
        await catalog.put_server(DataServer(id=f"s{name}", node=name, address="x:1", path="/d"))
    await catalog.set_draining("c", True)
    return store, catalog


def _volume(name: str, *replicas: tuple[str, ReplicaState]) -> Volume:
    return Volume(id=name * 8, name=name, size=1 << 20, replica_count=len(replicas), fs="ext4",
                  replicas=[Replica(server=s, state=st) for s, st in replicas])


def test_node_rm_refuses_live_unknown_and_replica_holding_nodes() -> None:
    async def body() -> None:
        store, catalog = await _cluster()
        service = NodeRemoval(catalog)
        await catalog.add_volume(_volume("v", ("sa", ReplicaState.IN_SYNC),
                                         ("sc", ReplicaState.IN_SYNC)))
        with pytest.raises(NodeNotFound):
            await service.remove("nosuch")
        lease = await store.grant_lease(10)
        await store.put(liveness_key("c"), b"", lease=lease)
        with pytest.raises(NodeAlive):
            await service.remove("c")
        await store.revoke_lease(lease)  # c is down now
        with pytest.raises(NodeHoldsReplicas, match="drain it first"):
            await service.remove("c")
        assert {s.id for s in await catalog.servers()} == {"sa", "sb", "sc"}  # unchanged

        removed = await service.remove("c", force=True)
        assert (removed.data_servers, removed.replicas_to_rebuild) == (["sc"], 1)
        assert {n.name for n in await catalog.nodes()} == {"a", "b"}
        assert {s.id for s in await catalog.servers()} == {"sa", "sb"}
        assert await catalog.draining() == set()

    asyncio.run(body())


def test_node_rm_never_removes_the_last_in_sync_copy_even_forced() -> None:
    async def body() -> None:
        _, catalog = await _cluster()
        await catalog.add_volume(_volume("w", ("sb", ReplicaState.IN_SYNC),
                                         ("sa", ReplicaState.OUT_OF_SYNC)))
        with pytest.raises(LastCopy, match="w"):
            await NodeRemoval(catalog).remove("b", force=True)
        assert {n.name for n in await catalog.nodes()} == {"a", "b", "c"}
        removed = await NodeRemoval(catalog).remove("a", force=True)  # w keeps its copy on b
        assert removed.data_servers == ["sa"]

    asyncio.run(body())
