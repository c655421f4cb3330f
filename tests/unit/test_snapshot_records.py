"""Snapshot records in the catalog: holders follow the replicas, stale cuts are collected."""

from __future__ import annotations

import asyncio
import time
import uuid

from cargohold.core.models import Snapshot, SnapshotState, Volume, VolumeState
from cargohold.core.names import split_snapshot
from cargohold.errors import InvalidName
from cargohold.services.volumes import VolumeService
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore


def test_stale_cuts_are_collected_and_holders_follow_replicas() -> None:
    async def body() -> None:
        catalog = Catalog(MemoryStore())
        await catalog.add_volume(Volume(id="a" * 32, name="v", size=1 << 20, replica_count=2,
                                        fs="ext4", state=VolumeState.DETACHED))
        old = time.time() - 3600
        for name, state, created in (("stuck", SnapshotState.CUTTING, old),
                                     ("failed", SnapshotState.FAILED, old),
                                     ("young", SnapshotState.CUTTING, time.time()),
                                     ("ready", SnapshotState.READY, old)):
            await catalog.add_snapshot(Snapshot(
                id=uuid.uuid4().hex,
                name=name, volume="v", volume_id="a" * 32, size=1 << 20, state=state,
                created=created, servers=["s1", "s2"]))
        removed = await VolumeService(catalog).collect_stale_snapshots()
        assert sorted(removed) == ["v@failed", "v@stuck"]
        assert sorted(s.name for s in await catalog.snapshots("v")) == ["ready", "young"]

        await catalog.hold_snapshots("v", add=["s3"], drop=["s1"])
        ready = await catalog.snapshot("v", "ready")
        young = await catalog.snapshot("v", "young")
        assert ready.servers == ["s2", "s3"]
        assert young.servers == ["s1", "s2"]  # not cut yet: nobody holds it

    asyncio.run(body())


def test_snapshot_references() -> None:
    assert split_snapshot("pgdata@before-upgrade") == ("pgdata", "before-upgrade")
    for bad in ("pgdata", "a@b@c", "@x", "x@", "a b@c", 7):
        try:
            split_snapshot(bad)
        except InvalidName:
            continue
        raise AssertionError(f"{bad!r} was taken")
