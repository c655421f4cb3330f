"""A migration's handover when the remote fails to make the last point durable after the
source was fenced: the writes are let go once, and the error names the one way back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from cargohold.core.models import (
    Migration,
    MigrationState,
    Snapshot,
    SnapshotState,
    Volume,
    VolumeState,
)
from cargohold.errors import RemoteUnavailable
from cargohold.services.migrations import MigrationService
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore


class _Snapshots:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def create(self, volume: str, name: str, handover: bool = False) -> Snapshot:
        snapshot = Snapshot(id=uuid.uuid4().hex, name=name, volume=volume, volume_id="a" * 32,
                            size=1 << 20, state=SnapshotState.READY, created=time.time(),
                            servers=["s1"], phase="handover" if handover else "")
        await self.catalog.add_snapshot(snapshot)
        return snapshot


class _Replication:
    """Sends nothing; at the handover cuts the point, runs what follows the copy, then the
    remote's commit fails (its node died while it flushed)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.snapshots = _Snapshots(catalog)
        self.fenced: list[str] = []

    async def ship(self, name: str, cut: Callable[[str, str], Awaitable[Snapshot]] | None,
                   copied: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
        if cut is None:  # a round while in use: nothing left to send
            return {"bytes": 0}
        await cut(name, "repl-0123456789abcdef")
        assert copied is not None, "a handover fences while the remote commits"
        await copied()
        raise RemoteUnavailable(name="dr", detail="the connection was reset")

    async def fence(self, name: str, why: str) -> None:
        self.fenced.append(why)


def test_a_remote_that_fails_its_commit_after_the_fence() -> None:
    async def body() -> None:
        catalog = Catalog(MemoryStore())
        await catalog.add_volume(Volume(
            id="a" * 32, name="db", size=1 << 20, replica_count=2, fs="ext4",
            state=VolumeState.DETACHED,
            migration=Migration(remote="dr", node="n1", state=MigrationState.HANDOVER)))
        replication = _Replication(catalog)
        migrations = MigrationService(replication, "n1")  # type: ignore[arg-type]
        await migrations._run("db", "dr")
        moving = (await catalog.volume("db")).migration
        assert moving is not None and moving.state is MigrationState.FAILED
        assert "could not make the last point durable" in moving.error, moving.error
        assert "'cargohold volume promote db' here" in moving.error
        assert len(replication.fenced) == 1
        point = await catalog.snapshot("db", "repl-0123456789abcdef")
        assert point.phase == "release"  # the writes held were let go (refused: fenced)

    asyncio.run(body())
