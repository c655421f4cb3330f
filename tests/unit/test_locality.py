"""Locality: a replica moves to the node a volume is attached on (never while degraded or
rebuilding), a planned move picks the replica that makes room, and strict refuses an attach
where no replica can be local."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cargohold.core.models import (
    Attachment,
    DataServer,
    Locality,
    Node,
    Replica,
    ReplicaState,
    Volume,
    VolumeState,
)
from cargohold.errors import InvalidLocality, NodeNotFound, NotLocal, VolumeBusy
from cargohold.services.agent import Agent
from cargohold.services.controller.locality import LocalityKeeper, Moved
from cargohold.services.volumes import locality_of
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore

TIB = 1 << 40


class Replacements:
    """Stands in for the rebuild: records the replacements asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str]] = []

    async def replace(self, name: str, old: str, why: str, to: str = "") -> str:
        self.asked.append((name, old, to))
        return to


async def _cluster(free: dict[str, int] | None = None) -> Catalog:
    """Nodes n1..n3 with one data server each (s1..s3); n4 without any."""
    catalog = Catalog(MemoryStore())
    for i in (1, 2, 3):
        await catalog.put_server(DataServer(
            id=f"s{i}", node=f"n{i}", address=f"x:{i}", path=f"/d{i}", capacity=TIB,
            free=(free or {}).get(f"s{i}", TIB // 2)))
    for i in (1, 2, 3, 4):
        await catalog.put_node(Node(name=f"n{i}"))
    return catalog


def _volume(name: str, servers: tuple[str, ...], node: str = "",
            locality: Locality = Locality.BEST_EFFORT) -> Volume:
    v = Volume(id=name.ljust(32, "0"), name=name, size=1 << 30, replica_count=len(servers),
               fs="ext4", state=VolumeState.DETACHED, locality=locality,
               replicas=[Replica(server=s) for s in servers])
    if node:  # attached a while ago (a fresh attachment waits SETTLE seconds)
        v.state = VolumeState.ATTACHED
        v.attachment = Attachment(node=node, epoch=1, since=time.time() - 60)
    return v


def test_an_attached_volume_gets_a_replica_where_it_is_used() -> None:
    async def run() -> None:
        catalog = await _cluster(free={"s1": TIB // 4, "s2": TIB // 2})  # s1 the fuller
        for v in (_volume("far", ("s1", "s2"), node="n3"),  # moves: s1 makes room on s3
                  _volume("near", ("s1", "s3"), node="n3"),  # already local
                  _volume("off", ("s1", "s2"), node="n3", locality=Locality.OFF),
                  _volume("idle", ("s1", "s2")),  # not attached
                  _volume("nowhere", ("s1", "s2"), node="n4")):  # n4 has no data server
            await catalog.add_volume(v)
        degraded = _volume("degraded", ("s1", "s2"), node="n3")
        degraded.replicas[1].state = ReplicaState.OUT_OF_SYNC
        rebuilding = _volume("rebuilding", ("s1", "s2"), node="n3")
        rebuilding.replicas.append(Replica(server="s3", state=ReplicaState.RESYNCING,
                                           replaces="s2"))
        for v in (degraded, rebuilding):
            await catalog.add_volume(v)
        fresh = _volume("fresh", ("s1", "s2"), node="n3")
        assert fresh.attachment is not None
        fresh.attachment.since = time.time()  # attached just now: not yet
        await catalog.add_volume(fresh)
        rebuild = Replacements()
        keeper = LocalityKeeper(catalog, rebuild)  # type: ignore[arg-type]
        assert await keeper.run_once() == [Moved("far", "s1", "s3")]
        assert rebuild.asked == [("far", "s1", "s3")]

    asyncio.run(run())


def test_a_planned_move_prefers_a_stale_replica_and_says_why_it_cannot() -> None:
    async def run() -> None:
        catalog = await _cluster()
        volume = _volume("pg", ("s1", "s2"))
        volume.replicas[1].state = ReplicaState.OUT_OF_SYNC
        await catalog.add_volume(volume)
        rebuild = Replacements()
        keeper = LocalityKeeper(catalog, rebuild)  # type: ignore[arg-type]
        assert await keeper.move("pg", "n3", "asked") == Moved("pg", "s2", "s3")
        assert await keeper.move("pg", "n1", "asked") is None  # a replica is there
        with pytest.raises(NotLocal, match="node 'n4' has no data server"):
            await keeper.move("pg", "n4", "asked")
        with pytest.raises(NodeNotFound):
            await keeper.move("pg", "n9", "asked")
        assert len(rebuild.asked) == 1
        # the replica on n2 is on its way out (replaced by one on n3): a move there waits
        leaving = _volume("db", ("s1", "s2"))
        leaving.replicas.append(Replica(server="s3", state=ReplicaState.RESYNCING,
                                        replaces="s2"))
        await catalog.add_volume(leaving)
        with pytest.raises(VolumeBusy, match="moving its replica off node n2"):
            await keeper.move("db", "n2", "asked")
        assert await keeper.move("db", "n3", "asked") is None  # on its way there
        # attached on n1: the replica its consumer reads stays, though its disk is fuller
        fuller = await _cluster(free={"s1": TIB // 8, "s2": TIB // 2})
        await fuller.add_volume(_volume("web", ("s1", "s2"), node="n1"))
        keeper = LocalityKeeper(fuller, Replacements())  # type: ignore[arg-type]
        assert await keeper.move("web", "n3", "asked") == Moved("web", "s2", "s3")

    asyncio.run(run())


def test_strict_refuses_an_attach_where_no_replica_can_be_local(tmp_path: Path) -> None:
    async def run() -> None:
        catalog = await _cluster()
        await catalog.add_volume(_volume("pg", ("s1", "s2"), locality=Locality.STRICT))
        before = await catalog.volume("pg")
        agent = Agent(catalog, "n4", tmp_path, "memory://")
        with pytest.raises(NotLocal, match="locality strict"):
            await agent.attach("pg")
        assert await catalog.volume("pg") == before  # nothing claimed
        assert not (tmp_path / "engines").exists()

    asyncio.run(run())
    assert locality_of("strict") is Locality.STRICT
    with pytest.raises(InvalidLocality, match="choose best-effort"):
        locality_of("nearby")
