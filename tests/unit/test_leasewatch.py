"""The engine's watch on its node's lease: lost when the key is gone, or when nothing has
confirmed it for a whole TTL; a store that is slow for less than that loses nothing."""

from __future__ import annotations

import asyncio

import pytest

from cargohold.core.models import liveness_key
from cargohold.errors import LeaseLost, MetadataUnavailable
from cargohold.services.engine.leasewatch import LeaseWatch
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore


def test_the_lease_is_lost_once_its_key_is_gone() -> None:
    async def body() -> list[LeaseLost]:
        store = MemoryStore()
        lease = await store.grant_lease(10)
        await store.put(liveness_key("n1"), b"", lease=lease)
        lost: list[LeaseLost] = []
        watch = LeaseWatch(Catalog(store), "n1", 10, lost.append)
        await watch.run_once()
        assert lost == []
        await store.revoke_lease(lease)
        with pytest.raises(LeaseLost, match="expired"):
            await watch.run_once()
        return lost

    assert len(asyncio.run(body())) == 1


class Unreachable(Catalog):
    async def node_alive(self, name: str) -> bool:
        raise MetadataUnavailable(url="etcds://x", detail="no member answers")


def test_a_store_out_of_reach_loses_the_lease_only_after_a_whole_ttl() -> None:
    now = [100.0]
    lost: list[LeaseLost] = []
    watch = LeaseWatch(Unreachable(MemoryStore()), "n1", 5, lost.append, lambda: now[0])

    async def body() -> None:
        now[0] += 4
        await watch.run_once()  # 4 s without confirmation: the node may still hold it
        assert lost == []
        now[0] += 2
        with pytest.raises(LeaseLost, match="not confirmed for 6 s"):
            await watch.run_once()

    asyncio.run(body())
    assert len(lost) == 1
