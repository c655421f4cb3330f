"""Resync: bring the out-of-sync replicas of a detached volume up to date.

A replica that missed writes (its data server was down or unreachable) is marked out of
sync and never read. When its data server answers again, only the chunks that changed
while it was away are copied to it: the chunks whose generation is lower than the newest
among the in-sync replicas, read from the replica that holds the newest one and written
with that generation. Then a metadata CAS puts it back in the in-sync set.

A resync takes a new epoch, like an attach, so the data servers refuse whatever an older
writer might still send; an attach that comes during a resync takes a newer one and wins:
the resync's next request is refused as fenced, it stops, and its replicas stay out of
sync (what was copied is kept, so the next pass copies less). A resync never runs while
the volume is attached: the engine is the only writer then, and brings its replicas back
itself (:mod:`cargohold.services.engine.healer`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cargohold.clients.access import Access
from cargohold.clients.dataclient import CONTROL_TIMEOUT, DataClient
from cargohold.core.layout import CHUNK_SIZE, copy_plan, generation_table
from cargohold.core.models import DataServer, ReplicaState, Volume, VolumeState, server_up
from cargohold.errors import CargoholdError, VolumeBusy
from cargohold.services.copies import WINDOW, Budget, put_copy, replay_snapshots, together
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

PROGRESS_EVERY = 1.0  # seconds between progress records in the metadata store


@dataclass
class ResyncResult:
    volume: str
    replicas: list[str]  # data server ids brought back in sync
    chunks_copied: int
    bytes_copied: int
    chunks_total: int
    seconds: float


class Resync:
    def __init__(self, catalog: Catalog, rate: float = 0.0,
                 access: Access | None = None) -> None:
        """``rate``: bytes per second the copy may use (0: no limit); ``access``: TLS and
        capabilities (None: in the clear, as in-process tests do)."""
        self.catalog = catalog
        self.rate = rate
        self.access = access

    async def run_once(self) -> list[ResyncResult]:
        """Resync every detached volume that has an out-of-sync replica on a data server
        that is up again; a failure is logged and left for the next pass."""
        servers = {s.id: s for s in await self.catalog.servers()}
        done = []
        for volume in await self.catalog.volumes():
            if _due(volume, servers):
                try:
                    done.append(await self.resync(volume.name))
                except CargoholdError as e:
                    log.warning("resync of %s stopped: %s", volume.name, e)
        return done

    async def resync(self, name: str) -> ResyncResult:
        started = time.monotonic()
        servers = {s.id: s for s in await self.catalog.servers()}

        def begin(v: Volume) -> None:
            if not v.in_sync():
                raise VolumeBusy(name=name, state="without an in-sync replica")
            for r in v.replicas:
                if r.state is ReplicaState.OUT_OF_SYNC and server_up(servers.get(r.server)):
                    r.state, r.progress, r.since = ReplicaState.RESYNCING, 0.0, time.time()

        volume = await claim_detached(self.catalog, name, "resync", begin)
        epoch = volume.epoch
        targets = [r.server for r in volume.replicas if r.state is ReplicaState.RESYNCING]
        sources = [r.server for r in volume.in_sync() if server_up(servers.get(r.server))]
        log.info("resync of %s (epoch %d): %s from %s", name, epoch, targets, sources)
        clients = {sid: DataClient(servers[sid].address, sid, call_timeout=CONTROL_TIMEOUT,
                                      access=self.access, peer=servers[sid].node,
                                      copying=sid in targets)
                   for sid in sources + targets}
        copied = total = 0
        try:
            await asyncio.gather(*(clients[t].connect() for t in targets))
            # in-sync replicas hold the same data: any that answer will do as sources
            answers = await asyncio.gather(*(clients[s].connect() for s in sources),
                                           return_exceptions=True)
            for sid, answer in zip(sources, answers, strict=True):
                if isinstance(answer, CargoholdError):
                    log.warning("resync of %s: source %s unreachable: %s", name, sid, answer)
                    await clients.pop(sid).close()
                elif isinstance(answer, BaseException):
                    raise answer
            if not set(clients) - set(targets):
                raise VolumeBusy(name=name, state="without a reachable in-sync replica")
            first = next(s for s in sources if s in clients)
            for target in targets:  # the snapshots first, then the heads
                await replay_snapshots(clients[first], clients[target], volume.id, epoch,
                                       volume.size)
            tables = {sid: generation_table(await client.generations(volume.id))
                      for sid, client in clients.items()}
            if any(t not in tables for t in targets):
                raise VolumeBusy(name=name, state="resyncing to an unknown data server")
            total = -(-volume.size // CHUNK_SIZE)
            plan = copy_plan(volume.size, {s: tables[s] for s in sources if s in tables},
                         {t: tables[t] for t in targets})
            budget = Budget(self.rate)
            last_report = time.monotonic()
            pending = iter(plan)

            async def copier() -> None:  # WINDOW of these keep chunks in flight
                nonlocal copied, last_report
                for chunk, source, gen, stale in pending:
                    offset = chunk * CHUNK_SIZE
                    length = min(CHUNK_SIZE, volume.size - offset)
                    data = await clients[source].read(volume.id, epoch, offset, length)
                    await asyncio.gather(*(put_copy(clients[t], volume.id, epoch, offset, data,
                                                    gen) for t in stale))
                    copied += 1
                    await budget.spend(length)
                    if time.monotonic() - last_report >= PROGRESS_EVERY:
                        last_report = time.monotonic()
                        await self._progress(name, epoch, targets, copied / len(plan))

            await together([copier() for _ in range(WINDOW)])
            await asyncio.gather(*(clients[t].flush(volume.id, epoch) for t in targets))
        except CargoholdError as e:
            await self._finish(name, epoch, targets, in_sync=False, reason=f"resync: {e}")
            raise
        finally:
            await asyncio.gather(*(c.close() for c in clients.values()))
        await self._finish(name, epoch, targets, in_sync=True, reason="")
        await self.catalog.hold_snapshots(name, targets)
        result = ResyncResult(name, targets, copied, copied * CHUNK_SIZE, total,
                              time.monotonic() - started)
        log.info("resync of %s done: %d of %d chunks copied in %.1f s", name, copied, total,
                 result.seconds)
        return result

    async def _progress(self, name: str, epoch: int, targets: list[str], done: float) -> None:
        def record(v: Volume) -> Volume | None:
            if v.epoch != epoch:
                return None  # taken over: nothing to record
            for r in v.replicas:
                if r.server in targets and r.state is ReplicaState.RESYNCING:
                    r.progress = round(done, 3)
            return v

        await self.catalog.update_volume(name, record)

    async def _finish(self, name: str, epoch: int, targets: list[str], in_sync: bool,
                      reason: str) -> None:
        def finish(v: Volume) -> Volume | None:
            ok = in_sync and v.epoch == epoch and v.attachment is None
            changed = False
            for r in v.replicas:
                if r.server in targets and r.state is ReplicaState.RESYNCING:
                    r.state = ReplicaState.IN_SYNC if ok else ReplicaState.OUT_OF_SYNC
                    r.progress, r.since, changed = 0.0, time.time(), True
                    r.reason = "" if ok else reason or "resync interrupted (volume attached)"
            return v if changed else None

        try:
            await self.catalog.update_volume(name, finish)
        except CargoholdError as e:  # removed meanwhile: nothing left to record
            log.warning("resync of %s: cannot record the outcome: %s", name, e)


#: What a restore claims its new volume as (the only claim a volume being restored takes).
RESTORE = "a restore"


async def claim_detached(catalog: Catalog, name: str, what: str,
                         change: Callable[[Volume], None] | None = None) -> Volume:
    """Take a new epoch on detached volume ``name`` for ``what`` (a resync, a scrub), with
    ``change`` made in the same CAS: the data servers then refuse any older writer, and an
    attach that comes later takes a newer epoch and stops ``what`` (fenced)."""

    def claim(v: Volume) -> Volume:
        if v.attachment is not None or v.state is not VolumeState.DETACHED:
            raise VolumeBusy(name=name, state=f"{v.state.value} ({what} needs it detached)")
        if v.restoring and what != RESTORE:
            raise VolumeBusy(name=name, state=f"being restored from backup {v.restoring}")
        if change is not None:
            change(v)
        v.epoch += 1
        return v

    return await catalog.update_volume(name, claim)


def _due(volume: Volume, servers: dict[str, DataServer]) -> bool:
    return (volume.attachment is None and volume.state is VolumeState.DETACHED
            and any(server_up(servers.get(r.server)) for r in volume.in_sync())
            and any(r.state in (ReplicaState.OUT_OF_SYNC, ReplicaState.RESYNCING)
                    and server_up(servers.get(r.server)) for r in volume.replicas))
