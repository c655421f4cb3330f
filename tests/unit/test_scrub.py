"""The background scrub's choice: an attached volume's scrub is asked of its engine."""

from __future__ import annotations

import asyncio

from cargohold.core.models import Attachment, Volume, VolumeState
from cargohold.services.controller.scrub import Scrub
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore


def test_a_due_attached_volume_gets_a_scrub_request_once() -> None:
    async def body() -> None:
        catalog = Catalog(MemoryStore())
        await catalog.add_volume(Volume(
            id="a" * 32, name="busy", size=1 << 24, replica_count=2, fs="ext4",
            state=VolumeState.ATTACHED, attachment=Attachment(node="n1", epoch=3), created=1.0))
        scrub = Scrub(catalog)
        assert await scrub.run_once(every=60) is None  # asked, not run here
        asked = (await catalog.volume("busy")).scrub_requested
        assert asked > 0
        assert await scrub.run_once(every=60) is None
        assert (await catalog.volume("busy")).scrub_requested == asked  # pending: not again

    asyncio.run(body())
