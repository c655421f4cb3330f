"""An identical create that finds the volume being created waits for the other create."""

from __future__ import annotations

import asyncio

import pytest

from cargohold.core.models import Volume, VolumeState
from cargohold.errors import VolumeBusy
from cargohold.services.volumes import VolumeService
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore

MIB = 1 << 20


def _creating(name: str) -> Volume:
    return Volume(id="ab" * 16, name=name, size=64 * MIB, replica_count=2, fs="ext4",
                  state=VolumeState.CREATING)


def test_a_second_identical_create_returns_the_volume_once_the_first_finishes() -> None:
    async def body() -> Volume:
        catalog = Catalog(MemoryStore())
        await catalog.add_volume(_creating("v"))

        async def finish() -> None:
            await asyncio.sleep(0.2)

            def created(v: Volume) -> Volume:
                v.state = VolumeState.DETACHED
                return v

            await catalog.update_volume("v", created)

        finishing = asyncio.ensure_future(finish())
        volume = await VolumeService(catalog).create("v", "64M", 2, "ext4", exist_ok=True)
        await finishing
        return volume

    volume = asyncio.run(body())
    assert volume.state is VolumeState.DETACHED


def test_a_second_identical_create_says_so_when_the_first_fails() -> None:
    async def body() -> None:
        catalog = Catalog(MemoryStore())
        await catalog.add_volume(_creating("v"))

        async def fail() -> None:
            await asyncio.sleep(0.2)
            await catalog.remove_volume("v")  # what a failed create leaves: nothing

        failing = asyncio.ensure_future(fail())
        try:
            with pytest.raises(VolumeBusy, match="being created and failed"):
                await VolumeService(catalog).create("v", "64M", 2, "ext4", exist_ok=True)
        finally:
            await failing

    asyncio.run(body())
