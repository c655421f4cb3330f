"""The healer: an attached volume's engine brings its out-of-sync replicas back while the
volume is in use.

The engine is the only writer of an attached volume, so it is also the one that heals it:
the controller's resync (:mod:`cargohold.services.controller.resync`) only takes detached
volumes. Every ``INTERVAL`` seconds (a :class:`~cargohold.core.periodic.Periodic` the engine
runs, which stops once the attachment is fenced) the healer reads the volume record. Each
replica that is not in sync and whose data server is up again (a transient outage) or new (a
rebuild's replacement) catches up through ``Healable.catch_up``: the record says *resyncing*
with its progress, and the replica becomes in sync with a metadata CAS that holds only while
this attachment's epoch does. A replica that fails to catch up goes back to *out of sync* and
is tried again after ``RETRY_AFTER`` seconds. Members the record no longer lists as in sync
(the controller dropped a replaced replica) are let go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from cargohold.core.models import DataServer, Replica, ReplicaState, Volume, server_up
from cargohold.errors import CargoholdError, Fenced, VolumeBusy
from cargohold.services.copies import ScrubReport
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

INTERVAL = 2.0
RETRY_AFTER = 10.0


class Healable(Protocol):
    """What the healer needs of the volume's data path (the engine's ``ReplicaSet``)."""

    def holds(self, server_id: str) -> bool:
        """Whether the data path uses (or is adding) the replica on ``server_id``."""

    async def retire(self, in_sync: set[str]) -> None:
        """Stop using the replicas not in ``in_sync``."""

    async def catch_up(self, server: DataServer, begin: Callable[[], Awaitable[None]],
                       promote: Callable[[], Awaitable[None]],
                       progress: Callable[[float], Awaitable[None]],
                       rate: float = 0.0) -> tuple[int, int]:
        """Bring the replica on ``server`` level while in use; (chunks copied, total)."""

    async def scrub(self, rate: float = 0.0) -> ScrubReport:
        """Check every copy of every written chunk while in use, repairing bad ones."""


@dataclass
class Healed:
    server: str
    chunks_copied: int
    chunks_total: int
    seconds: float


class Healer:
    def __init__(self, catalog: Catalog, name: str, epoch: int, replicas: Healable,
                 rate: float = 0.0, scrub_rate: float = 0.0,
                 joining: Callable[[str], Awaitable[None]] | None = None) -> None:
        """``rate``: bytes per second a catch-up copy may use, ``scrub_rate`` a scrub
        (0: no limit). ``joining``: called with a caught-up replica's data server id
        before it is recorded in sync (writes held; a clone's origin checks what it
        lacks)."""
        self.catalog = catalog
        self.name = name
        self.epoch = epoch
        self.replicas = replicas
        self.rate = rate
        self.scrub_rate = scrub_rate
        self.joining = joining
        self._retry_at: dict[str, float] = {}

    async def run_once(self) -> list[Healed]:
        """One pass: let go of dropped members, bring back what can come back."""
        volume = await self.catalog.volume(self.name)
        self._check_epoch(volume)
        servers = {s.id: s for s in await self.catalog.servers()}
        await self.replicas.retire({r.server for r in volume.in_sync()})
        healed = []
        for replica in volume.replicas:
            server = servers.get(replica.server)
            if (replica.state is ReplicaState.IN_SYNC or server is None or not server_up(server)
                    or self.replicas.holds(replica.server)
                    or time.monotonic() < self._retry_at.get(replica.server, 0.0)):
                continue
            try:
                healed.append(await self.heal(server))
            except Fenced:
                raise
            except CargoholdError as e:
                self._retry_at[replica.server] = time.monotonic() + RETRY_AFTER
                log.warning("%s: replica on data server %s did not catch up (next try in "
                            "%.0f s): %s", self.name, replica.server, RETRY_AFTER, e)
        if volume.scrub_requested > volume.scrubbed:
            await self.scrub()
        return healed

    async def scrub(self) -> ScrubReport:
        """Scrub the volume in use (asked through ``Volume.scrub_requested``) and record the
        report."""
        report = await self.replicas.scrub(self.scrub_rate)

        def scrubbed(volume: Volume) -> Volume:
            self._check_epoch(volume)
            volume.scrubbed, volume.last_scrub = time.time(), asdict(report)
            return volume

        await self.catalog.update_volume(self.name, scrubbed)
        log.info("scrub of %s in use: %d chunks, %d copies repaired, %d chunks lost, %.1f s",
                 self.name, report.chunks, len(report.repaired), len(report.lost),
                 report.seconds)
        return report

    async def heal(self, server: DataServer) -> Healed:
        started = time.monotonic()
        try:
            copied, total = await self.replicas.catch_up(
                server, lambda: self._record(server.id, _begin),
                lambda: self._promote(server.id),
                lambda done: self._record(server.id, _progress(done)), self.rate)
        except BaseException as e:
            await self._give_up(server.id, "catching up stopped: the engine is stopping"
                                if isinstance(e, asyncio.CancelledError)
                                else f"catching up failed: {e}")
            raise
        await self.catalog.hold_snapshots(self.name, [server.id])
        healed = Healed(server.id, copied, total, time.monotonic() - started)
        log.info("%s: replica on data server %s back in sync while in use: %d of %d chunks "
                 "copied in %.1f s", self.name, server.id, copied, total, healed.seconds)
        return healed

    async def _promote(self, server_id: str) -> None:
        if self.joining is not None:
            await self.joining(server_id)
        await self._record(server_id, _promote)

    async def _give_up(self, server_id: str, reason: str) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._record(server_id, _out_of_sync(reason))),
                                   5.0)
        except (CargoholdError, TimeoutError) as e:
            log.warning("%s: cannot record that %s is out of sync again: %s", self.name,
                        server_id, e)

    async def _record(self, server_id: str, change: Callable[[Replica], bool]) -> None:
        """Apply ``change`` to this volume's replica on ``server_id`` (it returns whether it
        changed anything), while our epoch holds."""

        def update(volume: Volume) -> Volume | None:
            self._check_epoch(volume)
            for replica in volume.replicas:
                if replica.server == server_id:
                    return volume if change(replica) else None
            raise VolumeBusy(name=self.name, state=f"without a replica on {server_id}")

        await self.catalog.update_volume(self.name, update)

    def _check_epoch(self, volume: Volume) -> None:
        if volume.attachment is None or volume.attachment.epoch != self.epoch:
            raise Fenced(volume_id=volume.id, epoch=self.epoch, current=volume.epoch)


def _begin(replica: Replica) -> bool:
    if replica.state is ReplicaState.IN_SYNC:
        raise VolumeBusy(name="", state=f"in sync on {replica.server} already")
    if replica.state is not ReplicaState.RESYNCING:
        replica.since = time.time()
    replica.state, replica.progress = ReplicaState.RESYNCING, 0.0
    replica.reason = "catching up while in use"
    return True


def _progress(done: float) -> Callable[[Replica], bool]:
    def record(replica: Replica) -> bool:
        if replica.state is not ReplicaState.RESYNCING:
            return False
        replica.progress = round(done, 3)
        return True

    return record


def _promote(replica: Replica) -> bool:
    if replica.state is not ReplicaState.RESYNCING:
        raise VolumeBusy(name="", state=f"{replica.state.value} on {replica.server} meanwhile")
    replica.state, replica.reason, replica.progress = ReplicaState.IN_SYNC, "", 0.0
    replica.since = time.time()
    return True


def _out_of_sync(reason: str) -> Callable[[Replica], bool]:
    def back(replica: Replica) -> bool:
        if replica.state is not ReplicaState.RESYNCING:
            return False
        replica.state, replica.reason, replica.progress = ReplicaState.OUT_OF_SYNC, reason, 0.0
        replica.since = time.time()
        return True

    return back
