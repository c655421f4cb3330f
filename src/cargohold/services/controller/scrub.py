"""Scrub: read every copy of every written chunk, repair the bad ones, report the rest.

Data servers verify each block's CRC32 on every read, so reading a copy is checking it. A
copy that fails is rewritten, whole chunk, from an in-sync copy that reads clean (with the
chunk's newest generation); a chunk with no clean copy left is reported as lost and left
alone. Like the resync, a scrub here takes a new epoch and runs only while the volume is
detached; an attach during a scrub fences it and it stops. The engine is the only writer of
an attached volume, so its scrub is asked of the engine (``Volume.scrub_requested``, run by
``ReplicaSet.scrub`` under chunk locks) and the report comes back in ``Volume.last_scrub``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict

from cargohold.clients.access import Access
from cargohold.clients.dataclient import CONTROL_TIMEOUT, DataClient
from cargohold.core.layout import CHUNK_SIZE, generation_table
from cargohold.core.models import Volume, VolumeState, server_up
from cargohold.errors import CargoholdError, ChecksumMismatch, VolumeBusy
from cargohold.services.controller.resync import claim_detached
from cargohold.services.copies import Budget, ScrubReport, scrub_snapshots
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)


class Scrub:
    def __init__(self, catalog: Catalog, rate: float = 0.0,
                 access: Access | None = None) -> None:
        """``rate``: bytes per second the reads may use (0: no limit); ``access``: TLS and
        capabilities (None: in the clear, as in-process tests do)."""
        self.catalog = catalog
        self.rate = rate
        self.access = access

    async def run_once(self, every: float) -> ScrubReport | None:
        """Scrub the volume whose last scrub (or creation) is oldest, if that is ``every``
        seconds ago or more (one volume a pass, so that other duties keep their turn). An
        attached volume's scrub is asked of its engine (``request``), not awaited."""
        now = time.time()
        due = [v for v in await self.catalog.volumes()
               if v.state in (VolumeState.DETACHED, VolumeState.ATTACHED)
               and v.scrub_requested <= v.scrubbed
               and now - max(v.scrubbed, v.created) >= every]
        if not due:
            return None
        oldest = min(due, key=lambda v: max(v.scrubbed, v.created))
        try:
            if oldest.attachment is not None:
                await self.request(oldest.name)
                return None
            return await self.scrub(oldest.name)
        except CargoholdError as e:
            log.warning("background scrub of %s stopped: %s", oldest.name, e)
            return None

    async def request(self, name: str) -> float:
        """Ask the engine of attached volume ``name`` for a scrub (its healer runs it, see
        ``ReplicaSet.scrub``); returns the time of the request."""
        asked = time.time()

        def ask(v: Volume) -> Volume:
            if v.attachment is None:
                raise VolumeBusy(name=name, state="detached (scrub it directly)")
            v.scrub_requested = asked
            return v

        await self.catalog.update_volume(name, ask)
        return asked

    async def scrub_any(self, name: str, timeout: float = 3600.0) -> ScrubReport:
        """Scrub ``name`` now: here when it is detached, by its engine when it is attached
        (waiting up to ``timeout`` seconds for the engine's report)."""
        volume = await self.catalog.volume(name)
        if volume.attachment is None:
            return await self.scrub(name)
        asked = await self.request(name)
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.sleep(0.2)
            volume = await self.catalog.volume(name)
            if volume.scrubbed >= asked and volume.last_scrub is not None:
                return ScrubReport(**volume.last_scrub)
            if volume.attachment is None:
                return await self.scrub(name)  # detached meanwhile
            if time.monotonic() > deadline:
                raise VolumeBusy(name=name, state=f"attached on {volume.attachment.node}, whose "
                                 f"engine did not scrub it within {timeout:g} s")

    async def scrub(self, name: str) -> ScrubReport:
        started = time.monotonic()
        servers = {s.id: s for s in await self.catalog.servers()}

        volume = await claim_detached(self.catalog, name, "scrub")
        epoch, report = volume.epoch, ScrubReport(name)
        clients: dict[str, DataClient] = {}
        try:
            for replica in volume.in_sync():
                server = servers.get(replica.server)
                client = (DataClient(server.address, server.id, call_timeout=CONTROL_TIMEOUT,
                                     access=self.access, peer=server.node)
                          if server is not None and server_up(server) else None)
                try:
                    if client is None:
                        raise VolumeBusy(name=name, state="with a replica on a down server")
                    await client.connect()
                    clients[replica.server] = client
                except CargoholdError as e:
                    if client is not None:
                        await client.close()
                    log.warning("scrub of %s skips %s: %s", name, replica.server, e)
                    report.skipped.append(replica.server)
            tables = {sid: generation_table(await c.generations(volume.id))
                      for sid, c in clients.items()}
            budget = Budget(self.rate)
            for chunk in range(-(-volume.size // CHUNK_SIZE)):
                gens = {sid: t[chunk] if chunk < len(t) else 0 for sid, t in tables.items()}
                newest = max(gens.values(), default=0)
                if not newest:
                    continue  # never written: thin, nothing to read
                report.chunks += 1
                offset = chunk * CHUNK_SIZE
                length = min(CHUNK_SIZE, volume.size - offset)
                good: bytes | None = None
                bad = []
                for sid, client in clients.items():
                    try:
                        data = await client.read(volume.id, epoch, offset, length)
                    except ChecksumMismatch as e:
                        log.error("scrub of %s: %s", name, e)
                        bad.append(sid)
                        continue
                    report.bytes_read += length
                    if good is None or gens[sid] == newest:
                        good = data
                    await budget.spend(length)
                if bad and good is None:
                    report.lost.append(chunk)
                    continue
                for sid in bad:
                    assert good is not None
                    await clients[sid].write(volume.id, epoch, offset, good, newest)
                    report.repaired.append({"chunk": chunk, "server": sid})
            await scrub_snapshots(clients, volume.id, epoch, report)
            await asyncio.gather(*(c.flush(volume.id, epoch) for c in clients.values()))
        finally:
            await asyncio.gather(*(c.close() for c in clients.values()))
        report.seconds = round(time.monotonic() - started, 3)

        def scrubbed(v: Volume) -> Volume:
            v.scrubbed, v.last_scrub = time.time(), asdict(report)
            return v

        await self.catalog.update_volume(name, scrubbed)
        log.info("scrub of %s: %d chunks, %d copies repaired, %d chunks lost, %d replicas "
                 "skipped, %.1f s", name, report.chunks, len(report.repaired), len(report.lost),
                 len(report.skipped), report.seconds)
        return report
