"""The engine's part in snapshots: cutting them at one write barrier while the volume is used.

Whoever asks for a snapshot of an attached volume (:mod:`cargohold.services.snapshots`)
puts its record in the metadata store, in state *cutting* and naming this attachment's node
and epoch. The engine watches its volume's snapshots and, for each such record: freezes the
mounted file system (FIFREEZE: it writes its dirty data and journal, and holds new writes),
cuts the snapshot on every in-sync replica with writes held (``ReplicaSet.hold``, ``cut``),
thaws, and records the outcome: *ready*, with the data servers that keep it and how long
writers waited, or *failed* and why (the asker removes that record). A record gone by then
(its asker gave up) is forgotten on the replicas again, so nothing is kept that no record
names. A group snapshot's members each hold their writes until all are held
(``_hold_for_group``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from cargohold.clients import kernel
from cargohold.core.models import MigrationState, Snapshot, SnapshotState, snapshot_key
from cargohold.errors import CargoholdError, Fenced, LeaseLost, SnapshotFailed
from cargohold.services.engine.replicaset import ReplicaSet
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

#: How often the records are read again without a change seen (a missed watch event).
RECHECK = 2.0
#: The longest an engine holds its volume's writes waiting for the rest of a group snapshot.
GROUP_HOLD = 10.0
#: The longest a freeze may take (the file system writes what it holds first).
FREEZE_TIMEOUT = 30.0
#: The longest the writes ahead of a cut are waited for (writers going on); past it the cut
#: goes on, and its freeze writes the rest, within ``FREEZE_TIMEOUT``.
WRITE_AHEAD_TIMEOUT = 10.0
#: The longest an engine holds writes after a migration's last cut, waiting to be handed
#: over (fenced) or let go; past it the writes go on here (the migration then fails).
HANDOVER_HOLD = 60.0
_HANDOVER_POLL = 0.01
_MIGRATION_LOOK = 0.5  # seconds between looks at the migration (and its node's lease)


class Cutter:
    """Cuts the snapshots asked of one attachment (volume ``name`` at ``epoch``)."""

    def __init__(self, catalog: Catalog, name: str, epoch: int, node: str,
                 replicas: ReplicaSet) -> None:
        self.catalog = catalog
        self.name = name
        self.epoch = epoch
        self.node = node
        self.replicas = replicas
        self._changed = asyncio.Event()

    def _mine(self, snapshot: Snapshot) -> bool:
        return (snapshot.state is SnapshotState.CUTTING and snapshot.node == self.node
                and snapshot.epoch == self.epoch)

    async def run_once(self) -> int:
        """Cut every snapshot asked of this attachment; return how many were cut."""
        cut = 0
        for snapshot in await self.catalog.snapshots(self.name):
            if self._mine(snapshot):
                cut += await self.cut(snapshot)
        return cut

    async def run_forever(self) -> None:
        watcher = asyncio.ensure_future(self._watch())
        try:
            while True:
                self._changed.clear()
                try:
                    await self.run_once()
                except (Fenced, LeaseLost):
                    raise
                except CargoholdError as e:
                    log.warning("%s: snapshot requests: %s", self.name, e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), RECHECK)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            try:
                async for _ in self.catalog.store.watch(snapshot_key(self.name)):
                    self._changed.set()
                return  # the store closed
            except CargoholdError as e:  # compacted, unavailable: read again, watch again
                log.debug("%s: snapshot watch: %s", self.name, e)
                self._changed.set()
                await asyncio.sleep(RECHECK)

    async def cut(self, snapshot: Snapshot) -> int:
        """Cut one snapshot and record the outcome; return 1 if it was cut."""
        mountpoint = ""
        if snapshot.freeze:
            volume = await self.catalog.volume(self.name)
            att = volume.attachment
            if att is not None and att.epoch == self.epoch:
                mountpoint = att.mountpoint
        error = ""
        servers: list[str] = []
        frozen = holding = False
        steps: dict[str, float] = {}
        try:
            await asyncio.wait_for(self._write_ahead(mountpoint), WRITE_AHEAD_TIMEOUT)
        except (CargoholdError, TimeoutError) as e:  # the cut writes it all, writes held
            log.warning("%s: writing ahead of snapshot %s: %s", self.name, snapshot.name,
                        str(e) or f"not done in {WRITE_AHEAD_TIMEOUT:g} s")
        started = time.monotonic()
        try:
            if mountpoint:
                await self._freeze(mountpoint)
                frozen = True
            steps["freeze"] = time.monotonic() - started
            await self.replicas.hold()
            holding = True
            if snapshot.group:
                await self._hold_for_group(snapshot)
            steps["barrier"] = time.monotonic() - started
            servers = await self.replicas.cut(snapshot.id, snapshot.created)
            steps["cut"] = time.monotonic() - started
            if snapshot.handover:
                await self._hand_over(snapshot, servers, started)
        except CargoholdError as e:
            error = str(e)
        finally:
            if holding:
                self.replicas.release()
            if frozen:
                try:
                    await asyncio.to_thread(kernel.thaw, mountpoint)
                except CargoholdError as e:
                    log.error("%s: thawing %s failed: %s", self.name, mountpoint, e)
        held = time.monotonic() - started
        if error:
            log.error("%s: snapshot %s failed: %s", self.name, snapshot.name, error)
        else:
            log.info("%s: snapshot %s cut on %s; writes held %.1f ms (%s)", self.name,
                     snapshot.name, servers, held * 1000,
                     ", ".join(f"{k} at {v * 1000:.1f}" for k, v in steps.items()))

        if snapshot.handover and not error:
            await self._record_hold(snapshot, held)
            return 1

        def outcome(s: Snapshot) -> Snapshot | None:
            if not self._mine(s) or s.id != snapshot.id:
                return None
            s.state = SnapshotState.FAILED if error else SnapshotState.READY
            s.servers, s.held, s.error, s.phase = servers, held, error, ""
            return s

        recorded = await self.catalog.update_snapshot(self.name, snapshot.name, outcome)
        if not error and (recorded is None or recorded.id != snapshot.id
                          or recorded.state is not SnapshotState.READY):
            log.warning("%s: snapshot %s was given up meanwhile: forgetting it", self.name,
                        snapshot.name)
            await self._forget(snapshot.id)
            return 0
        return 0 if error else 1

    async def _hand_over(self, snapshot: Snapshot, servers: list[str], started: float) -> None:
        """A migration's last point is cut: say so (phase *handover*), then keep the writes
        held until the migration lets them go (phase *release*, once it has fenced the
        volume on its data servers, which then refuse them; or the record gone: it failed),
        or ``HANDOVER_HOLD`` has passed. (Not on the record's epoch alone: a data server not
        fenced yet would take what is let go.)"""
        def cut(s: Snapshot) -> Snapshot | None:
            if not self._mine(s) or s.id != snapshot.id:
                raise SnapshotFailed(name=snapshot.ref, detail="given up before the cut")
            s.state, s.servers, s.phase = SnapshotState.READY, servers, "handover"
            s.held = time.monotonic() - started
            return s

        await self.catalog.update_snapshot(self.name, snapshot.name, cut)
        log.info("%s: last point %s of a migration cut; writes held until it is handed over",
                 self.name, snapshot.name)
        deadline = time.monotonic() + HANDOVER_HOLD
        looked = 0.0
        while time.monotonic() < deadline:
            now = await self.catalog.find_snapshot(self.name, snapshot.name)
            if now is None or now.id != snapshot.id or now.phase == "release" or \
                    now.state is not SnapshotState.READY:
                log.warning("%s: the migration let the writes go", self.name)
                return
            if time.monotonic() - looked > _MIGRATION_LOOK:
                looked = time.monotonic()
                if not await self._migration_alive():
                    log.error("%s: the migration or the node running it is gone: the writes "
                              "go on here", self.name)
                    return
            await asyncio.sleep(_HANDOVER_POLL)
        log.error("%s: not handed over within %g s: the writes go on here", self.name,
                  HANDOVER_HOLD)

    async def _migration_alive(self) -> bool:
        volume = await self.catalog.find_volume(self.name)
        moving = volume.migration if volume is not None else None
        return (moving is not None and moving.state is MigrationState.HANDOVER
                and await self.catalog.node_alive(moving.node))

    async def _record_hold(self, snapshot: Snapshot, held: float) -> None:
        """How long the writers of a migration's last point waited, on its record."""
        def hold(s: Snapshot) -> Snapshot | None:
            if s.id != snapshot.id:
                return None
            s.held, s.phase = held, "released"
            return s

        with contextlib.suppress(CargoholdError):
            await self.catalog.update_snapshot(self.name, snapshot.name, hold)
        log.info("%s: writes of the migration's last point held %.1f ms", self.name,
                 held * 1000)

    async def _write_ahead(self, mountpoint: str) -> None:
        """Write what is dirty before writes are held (the file system's, then the
        replicas'), writers going on: the freeze and the cut, which writers wait for, then
        write only what came since (with the cut's flush skipped when nothing came and its
        answer not counting what each snapshot holds alone, a cut under fio randwrite held
        writes 39-78 ms instead of 115-225)."""
        if mountpoint:
            await asyncio.to_thread(kernel.sync_file_system, mountpoint)
        await self.replicas.flush()

    async def _freeze(self, mountpoint: str) -> None:
        """FIFREEZE, given up after ``FREEZE_TIMEOUT`` (a file system that cannot write
        what it holds, say a replica stalls): writers must not wait on it for long. A freeze
        that ends later is thawed at once."""
        freezing = asyncio.ensure_future(asyncio.to_thread(kernel.freeze, mountpoint))
        try:
            await asyncio.wait_for(asyncio.shield(freezing), FREEZE_TIMEOUT)
        except TimeoutError:
            def thaw_late(done: asyncio.Future[None]) -> None:
                if not done.cancelled() and done.exception() is None:
                    log.warning("%s: the freeze given up ended: thawing", self.name)
                    asyncio.ensure_future(asyncio.to_thread(kernel.thaw, mountpoint))

            freezing.add_done_callback(thaw_late)
            raise SnapshotFailed(name=self.name, detail=f"the file system at {mountpoint} "
                                 f"did not freeze within {FREEZE_TIMEOUT:g} s") from None

    async def _hold_for_group(self, snapshot: Snapshot) -> None:
        """Say this volume is held, then wait (writes held) until every volume of the group
        is held or cut: that moment is the group's one instant. A member that failed, or a
        wait over ``GROUP_HOLD``, fails this cut too (and lets the writes go)."""
        def held(s: Snapshot) -> Snapshot | None:
            if not self._mine(s) or s.id != snapshot.id:
                raise SnapshotFailed(name=snapshot.ref, detail="the group was given up")
            s.phase = "held"
            return s

        await self.catalog.update_snapshot(self.name, snapshot.name, held)
        deadline = time.monotonic() + GROUP_HOLD
        while True:
            members = [s for s in await self.catalog.snapshots()
                       if s.group == snapshot.group]
            if any(s.state is SnapshotState.FAILED for s in members) or not any(
                    s.id == snapshot.id for s in members):
                raise SnapshotFailed(name=snapshot.ref, detail="another volume of the group "
                                     "failed")
            if len(members) >= snapshot.group_size and all(
                    s.phase == "held" or s.state is SnapshotState.READY for s in members):
                return
            if time.monotonic() > deadline:
                raise SnapshotFailed(name=snapshot.ref, detail=f"the other volumes of group "
                                     f"{snapshot.group} were not held within {GROUP_HOLD:g} s")
            await asyncio.sleep(0.005)

    async def _forget(self, snapshot_id: str) -> None:
        for member in list(self.replicas.members):
            try:
                await member.client.delete_snapshot(self.replicas.volume_id, self.epoch,
                                                    snapshot_id)
            except CargoholdError as e:
                log.warning("%s: forgetting snapshot %s on %s: %s", self.name, snapshot_id,
                            member.server.id, e)
