"""Rounds of one volume's replication go one after the other, whoever starts them (the
controller's schedule, a migration): two at once would each begin a session on the remote,
and the later would fence the earlier."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import TracebackType
from typing import Any

from cargohold.core.models import Replication, Snapshot, SnapshotState, Volume, VolumeState
from cargohold.services.replication import ReplicationService
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore


class _Snapshots:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def remove(self, volume: str, name: str) -> None:
        pass


class _Remote:
    async def __aenter__(self) -> _Remote:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        pass


class _Remotes:
    async def open(self, name: str) -> _Remote:
        return _Remote()


def test_two_rounds_of_a_volume_started_together_run_one_after_the_other() -> None:
    async def body() -> None:
        catalog = Catalog(MemoryStore())
        await catalog.add_volume(Volume(
            id="a" * 32, name="app", size=1 << 20, replica_count=2, fs="ext4",
            state=VolumeState.ATTACHED, replication=Replication(remote="dr", every=60.0)))
        await catalog.add_volume(Volume(
            id="b" * 32, name="other", size=1 << 20, replica_count=2, fs="ext4",
            state=VolumeState.ATTACHED, replication=Replication(remote="dr", every=60.0)))
        service = ReplicationService(_Snapshots(catalog), _Remotes())  # type: ignore[arg-type]
        events: list[str] = []

        async def send(volume: Volume, snapshot: Snapshot, *args: Any) -> int:
            events.append(f"{volume.name} {snapshot.name} sends")
            await asyncio.sleep(0.05)
            events.append(f"{volume.name} {snapshot.name} sent")
            return 0

        def cut(tag: str):  # type: ignore[no-untyped-def]
            async def made(name: str, snapshot: str) -> Snapshot:
                events.append(f"{name} {tag} cut")
                return Snapshot(id=uuid.uuid4().hex, name=tag, volume=name, volume_id="a" * 32,
                                size=1 << 20, state=SnapshotState.READY, created=time.time(),
                                servers=["s1"])
            return made

        service._send = send  # type: ignore[method-assign]
        await asyncio.gather(service.ship("app", cut("first")),
                             service.ship("app", cut("second")),
                             service.ship("other", cut("beside")))
        app = [e for e in events if e.startswith("app")]
        assert app == ["app first cut", "app first sends", "app first sent",
                       "app second cut", "app second sends", "app second sent"], events
        # another volume's round is not held up by them
        assert events.index("other beside sends") < events.index("app first sent")

    asyncio.run(body())
