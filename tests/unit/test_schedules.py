"""Backup schedules (``BackupSchedules.run_once``) over a fake backup service."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cargohold.core.models import BackupJob, BackupState, Volume
from cargohold.errors import BackupRunning, InvalidArgument
from cargohold.services.schedules import BackupSchedules, parse_every
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore


class FakeBackups:
    """Takes backups at once (or refuses: one runs); keeps what a target would list."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.made: list[dict[str, Any]] = []
        self.removed: list[str] = []
        self.collections = 0
        self.busy = False
        self.finish = BackupState.COMPLETE

    async def target(self) -> dict[str, Any]:
        return {"url": "s3://b"}

    async def create(self, volume: str) -> BackupJob:
        if self.busy:
            raise BackupRunning(name=volume, id="other")
        job = BackupJob(id=f"b{len(self.made)}", kind="backup", volume=volume,
                        state=self.finish)
        await self.catalog.start_backup_job(job)
        await self.catalog.put_backup_job(job)
        self.made.append({"id": job.id, "volume": volume, "state": job.state.value})
        return job

    async def listing(self, volume: str = "") -> list[dict[str, Any]]:
        return [b for b in self.made if b["id"] not in self.removed
                and b["state"] == "complete" and (not volume or b["volume"] == volume)]

    async def remove(self, backup_id: str, collect: bool = True) -> dict[str, Any]:
        self.removed.append(backup_id)
        return {}

    async def collect(self) -> dict[str, Any]:
        self.collections += 1
        return {}


async def _setup() -> tuple[BackupSchedules, FakeBackups, Catalog]:
    catalog = Catalog(MemoryStore())
    await catalog.add_volume(Volume(id="0" * 32, name="pg", size=1 << 30, replica_count=2,
                                    fs="ext4"))
    backups = FakeBackups(catalog)
    return BackupSchedules(backups, least=1.0), backups, catalog  # type: ignore[arg-type]


def test_due_backups_start_once_per_period_and_the_newest_are_kept() -> None:
    async def run() -> None:
        schedules, backups, catalog = await _setup()
        await schedules.set("pg", "10s", keep=2)
        assert await schedules.run_once(now=1000.0) == ["b0"]
        assert await schedules.run_once(now=1005.0) == []  # not due yet
        # a second controller that read the record before the first took its turn
        stale = BackupSchedules(backups, least=1.0)  # type: ignore[arg-type]
        assert await schedules.run_once(now=1010.0) == ["b1"]
        assert await stale.run_once(now=1010.0) == []  # the turn is taken: not twice
        assert await schedules.run_once(now=1020.0) == ["b2"]
        await schedules.run_once(now=1021.0)  # b2 ended: retention runs
        assert backups.removed == ["b0"] and backups.collections >= 1
        [record] = await schedules.listing()
        assert record["last_job"] == "b2" and record["retained"] is True

    asyncio.run(run())


def test_a_running_backup_takes_the_turn_and_a_failed_one_keeps_everything() -> None:
    async def run() -> None:
        schedules, backups, catalog = await _setup()
        await schedules.set("pg", 60, keep=1)
        backups.busy = True
        assert await schedules.run_once(now=100.0) == []  # one runs: no second
        backups.busy = False
        backups.finish = BackupState.FAILED
        assert await schedules.run_once(now=200.0) == ["b0"]
        await schedules.run_once(now=201.0)
        assert backups.removed == []
        # the volume went: its schedule goes too
        await catalog.remove_volume("pg")
        assert await schedules.run_once(now=400.0) == []
        assert await schedules.listing() == []

    asyncio.run(run())


def test_periods_and_refusals() -> None:
    assert parse_every("90") == 90 and parse_every("30m") == 1800 and parse_every("7d") == 604800
    for bad in ("1x", "-5", "", "1.5h", "10s", "400d"):
        with pytest.raises(InvalidArgument):
            parse_every(bad)

    async def run() -> None:
        schedules, _, _ = await _setup()
        with pytest.raises(InvalidArgument, match="keep"):
            await schedules.set("pg", "1h", keep=-1)
        with pytest.raises(Exception, match="nope"):
            await schedules.set("nope", "1h")
        assert await schedules.remove("pg") is False

    asyncio.run(run())
