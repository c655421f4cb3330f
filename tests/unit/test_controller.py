"""Controller election on the in-memory store: one leader, and it stops at once."""

from __future__ import annotations

import asyncio
import time

from cargohold.core.models import DataServer, ServerState, liveness_key
from cargohold.services.controller.controller import Controller
from cargohold.services.volumes import VolumeService
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore


async def _node(store: MemoryStore, name: str, ttl: float = 5.0) -> Controller:
    catalog = Catalog(store)
    controller = Controller(store, catalog, VolumeService(catalog), name)
    lease = await store.grant_lease(ttl)
    await store.put(liveness_key(name), b"", lease=lease)
    controller.renewed(lease, ttl, time.monotonic())
    return controller


def test_exactly_one_leads_and_the_next_takes_over_when_its_lease_ends() -> None:
    async def body() -> None:
        store = MemoryStore()
        a, b, c = [await _node(store, n) for n in ("a", "b", "c")]
        assert [await x.campaign() for x in (a, b, c)] == [True, False, False]
        assert [await x.campaign() for x in (a, b, c)] == [True, False, False]  # stable
        assert await b.leader() == "a"
        await store.revoke_lease(a.lease)  # a's node is gone
        assert not await a.campaign()  # it notices its key is not its own any more
        assert [await x.campaign() for x in (b, c)] == [True, False]
        assert await c.leader() == "b"

    asyncio.run(body())


def test_a_leader_that_cannot_renew_stops_without_asking_the_store() -> None:
    async def body() -> None:
        store = MemoryStore()
        a = await _node(store, "a", ttl=0.2)
        assert await a.campaign() and a.leading
        await asyncio.sleep(0.25)  # no renewal within the TTL: it may have lost the lease
        assert not a.leading
        a.renewed(a.lease, 5.0, time.monotonic())  # renewed again (same lease): may lead
        a.resign()
        assert not a.leading

    asyncio.run(body())


def test_down_nodes_servers_are_marked_down_by_the_leader_only() -> None:
    async def body() -> None:
        store = MemoryStore()
        catalog = Catalog(store)
        a, b = await _node(store, "a"), await _node(store, "b")
        for sid, node in (("s1", "a"), ("s2", "b"), ("s3", "gone")):
            await catalog.put_server(DataServer(id=sid, node=node, address="x:1", path="/d"))
        assert await b.mark_down_servers() == []  # b does not lead: it does nothing
        await a.run_once()
        states = {s.id: s.state for s in await catalog.servers()}
        assert states == {"s1": ServerState.UP, "s2": ServerState.UP, "s3": ServerState.DOWN}

    asyncio.run(body())
