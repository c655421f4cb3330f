"""A create leaves nothing behind whatever interrupts it: a cancellation (the node stopping)
or a data server that stops answering. In-process data servers on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest

from cargohold.adapters.dataserver import serve
from cargohold.core.models import DataServer, Volume, VolumeState
from cargohold.errors import DataServerUnavailable
from cargohold.services import volumes as volumes_module
from cargohold.services.volumes import VolumeService
from cargohold.stores.catalog import Catalog
from cargohold.stores.chunkstore import MemoryChunkStore
from cargohold.stores.metadata import MemoryStore

pytestmark = pytest.mark.timeout(60)


def _record(i: int, address: str) -> DataServer:
    return DataServer(id=f"s{i}", node=f"n{i}", address=address, path="/d",
                      capacity=1 << 40, free=1 << 40)


def test_a_cancelled_create_leaves_no_record_and_no_replica() -> None:
    """Cancelled at every point it can be (the node stopping, say): nothing is left."""

    async def body(delay: float) -> tuple[list[Volume], int]:
        stores = [MemoryChunkStore(f"s{i}") for i in range(2)]
        servers = [await serve(s, "127.0.0.1", 0) for s in stores]
        try:
            catalog = Catalog(MemoryStore())
            for i, server in enumerate(servers):
                await catalog.put_server(_record(i, server.address))
            create = asyncio.ensure_future(VolumeService(catalog).create("v", "64M", 2))
            await asyncio.sleep(delay)
            create.cancel()
            try:
                await create
            except asyncio.CancelledError:
                pass
            else:  # it finished first: then it must be whole
                assert [v.state for v in await catalog.volumes()] == [VolumeState.DETACHED]
                return [], 0
            await asyncio.sleep(0.05)  # the shielded rollback finishes
            return await catalog.volumes(), sum(len(s.open_replicas()) for s in stores)
        finally:
            for server in servers:
                await server.close()

    for delay in (0.0, 0.001, 0.002, 0.004, 0.008, 0.016):
        volumes, replicas = asyncio.run(body(delay))
        assert volumes == [] and replicas == 0, delay


def test_a_data_server_that_stops_answering_fails_the_create_cleanly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """It accepts the connection and reads, but never answers: the create fails with a clear
    error after the control timeout instead of hanging, and leaves a garbage entry for the
    replica it may have made there."""
    monkeypatch.setattr(volumes_module, "CONTROL_TIMEOUT", 0.3)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    async def body() -> tuple[str, list[Volume], list[tuple[str, str]], int]:
        store = MemoryChunkStore("s0")
        good = await serve(store, "127.0.0.1", 0)
        mute = await asyncio.start_server(silent, "127.0.0.1", 0)
        try:
            catalog = Catalog(MemoryStore())
            await catalog.put_server(_record(0, good.address))
            port = mute.sockets[0].getsockname()[1]
            await catalog.put_server(_record(1, f"127.0.0.1:{port}"))
            with pytest.raises(DataServerUnavailable) as failed:
                await asyncio.wait_for(VolumeService(catalog).create("v", "64M", 2), 10)
            garbage = await catalog.garbage()
            return str(failed.value), await catalog.volumes(), garbage, len(store.open_replicas())
        finally:
            await good.close()
            mute.close()
            await mute.wait_closed()

    message, volumes, garbage, replicas = asyncio.run(body())
    assert "no answer" in message
    assert volumes == [] and replicas == 0
    assert [server for server, _ in garbage] == ["s1"]
