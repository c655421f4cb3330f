"""Live migration of a volume to another cluster: rounds of changed chunks while it is in
use, then one short barrier, and the remote copy is the primary.

A migration rides on replication (``services/replication.py``): each round cuts a point and
sends the chunks written since the last one the remote holds. Rounds go on back to back
while the volume is in use until one sent at most ``SMALL`` bytes (or ``MAX_ROUNDS`` were
made). Then the *handover*: the last point is cut with the engine's writes held
(``Snapshot.handover``: the engine keeps them held after the cut), its changes are sent,
the source is fenced (its data servers refuse the engine from then on, so nothing
acknowledged here can be missing there) and the writes held are let go (they fail) while
the remote makes the point durable and records it (its flush waits on the disk: not in
the pause), a last look at the replicas checks that nothing was written since the point,
and the remote standby is promoted. The consumer is started on the other cluster. The
pause writers saw is the engine's hold, recorded on the point and in the migration.

What is left after a fault, and how to go on, is said in the migration's ``error``: a round
or the last copy that fails lets the writes go and leaves the source serving (the remote
keeps the last point it holds whole; ``volume migrate`` again sends only what changed); a
remote that fails to make the last point durable after the source was fenced leaves one
way, promoting the source again; one that cannot be promoted after it holds the point
leaves two, both named.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from cargohold.core.models import Migration, MigrationState, Snapshot, SnapshotState, Volume
from cargohold.core.names import check_name
from cargohold.errors import (
    CargoholdError,
    InvalidArgument,
    RemoteUnavailable,
    VolumeBusy,
    VolumeDemoted,
)
from cargohold.services.copies import snapshot_reader
from cargohold.services.replication import ReplicationService
from cargohold.services.standbys import point_snapshot

log = logging.getLogger(__name__)

MIB = 1 << 20
#: A round that sent at most this much, or took at most ``QUICK`` seconds, ends the copies
#: in use: the handover, whose writers wait, then copies about as much. (8 MiB left the
#: handover ~7 MiB to send under 2,000 random writes a second: 465 ms of writes held.)
SMALL = 2 * MIB
QUICK = 0.5
MAX_ROUNDS = 8
#: From the third round on, one that sent more than this share of the one before ends them.
SHRINKS = 0.8
#: Tries of a round that could not reach the remote, ``RETRY_AFTER`` seconds apart.
ROUND_TRIES = 3
RETRY_AFTER = 2.0
#: Tries of the promotion after the source was fenced, a second apart.
PROMOTE_TRIES = 15
#: Periods between copies of a volume replicated only for a migration (none: a year).
NO_ROUNDS = 366 * 86400.0
#: A migration told to hold waits this long in READY for its ``go`` (copying meanwhile).
READY_WAIT = 600.0
#: Seconds between the copies made while waiting (the remainder stays small).
READY_ROUNDS = 1.0
_GO_POLL = 0.02
ACTIVE = (MigrationState.COPYING, MigrationState.READY, MigrationState.HANDOVER)


class MigrationService:
    def __init__(self, replication: ReplicationService, node: str) -> None:
        self.replication = replication
        self.catalog = replication.catalog
        self.snapshots = replication.snapshots
        self.node = node
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def migrate(self, name: str, remote: str, wait: bool = False,
                      hold: bool = False) -> Volume:
        """Move volume ``name`` to cluster ``remote`` while in use; returns its record (the
        migration done or failed, with ``wait``). ``hold``: once the copies in use are done,
        keep copying and wait for ``go`` before the handover."""
        check_name(name)
        await self.catalog.remote(remote)
        volume = await self.catalog.volume(name)
        running = volume.migration
        if running is not None and running.state in ACTIVE:
            if running.node == self.node and name in self._tasks or \
                    await self.catalog.node_alive(running.node):
                raise VolumeBusy(name=name, state=f"migrating to {running.remote} (run by "
                                 f"node {running.node})")
        if volume.replication is None or volume.replication.remote != remote:
            await self.replication.start(name, remote, NO_ROUNDS)

        def begun(v: Volume) -> Volume:
            if v.fenced_by:
                raise VolumeDemoted(name=name, why=v.fenced_by)
            v.migration = Migration(remote=remote, node=self.node, hold=hold)
            return v

        volume = await self.catalog.update_volume(name, begun)
        task = asyncio.ensure_future(self._run(name, remote))
        self._tasks[name] = task
        task.add_done_callback(lambda _t: self._tasks.pop(name, None))
        if wait:
            await asyncio.shield(task)
            volume = await self.catalog.volume(name)
        return volume

    async def recover(self) -> list[str]:
        """At the node's start: the migrations it ran when it stopped ended there (failed),
        and the last point a handover left behind goes; return their volumes."""
        ended = []
        for volume in await self.catalog.volumes():
            moving = volume.migration
            if moving is None or moving.node != self.node or moving.state not in ACTIVE:
                continue
            await self._failed(volume.name, f"interrupted: node {self.node} stopped during "
                               f"it ({moving.state.value}); the source keeps serving (its "
                               "engine let the held writes go): migrate again")
            ended.append(volume.name)
            kept = volume.replication.point if volume.replication is not None else ""
            for snapshot in await self.catalog.snapshots(volume.name):
                if snapshot.handover and snapshot.name != point_snapshot(kept):
                    with contextlib.suppress(CargoholdError):
                        await self.snapshots.remove(volume.name, snapshot.name)
        return ended

    async def stop(self) -> None:
        """The node stops: migrations end as failed (the source keeps serving)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, name: str, remote: str) -> None:
        try:
            await self._copy_in_use(name)
            await self._wait_for_go(name)
            await self._record(name, state=MigrationState.HANDOVER)
            await self._hand_over(name, remote)
        except asyncio.CancelledError:
            await asyncio.shield(self._failed(name, "interrupted: the node running it "
                                              "stopped; the source keeps serving (migrate "
                                              "again to go on)"))
        except CargoholdError as e:
            log.error("migration of %s to %s failed: %s", name, remote, e)
            await asyncio.shield(self._failed(name, e.message))
        except Exception as e:
            log.exception("migration of %s to %s failed", name, remote)
            await asyncio.shield(self._failed(name, f"{type(e).__name__}: {e}"))

    async def _copy_in_use(self, name: str) -> None:
        """Rounds until one sent little, or no less than the one before (the volume is
        written faster than more rounds can catch up: the handover copies what one round
        leaves), or ``MAX_ROUNDS``."""
        before = 0
        for number in range(1, MAX_ROUNDS + 1):
            started = time.monotonic()
            sent = await self._round(name, None)
            quick = time.monotonic() - started <= QUICK
            if sent <= SMALL or quick or number > 2 and sent > SHRINKS * before:
                log.info("migration of %s: round %d sent %d bytes: handing over", name,
                         number, sent)
                return
            before = sent

    async def go(self, name: str) -> Volume:
        """Let a migration that holds (``hold``) go on to its handover."""
        def going(v: Volume) -> Volume:
            if v.migration is None or v.migration.state not in ACTIVE:
                raise InvalidArgument(what="volume", detail=f"{name!r} is not migrating")
            v.migration.go = True
            return v

        return await self.catalog.update_volume(name, going)

    async def _wait_for_go(self, name: str) -> None:
        volume = await self.catalog.volume(name)
        if volume.migration is None or not volume.migration.hold:
            return
        await self._record(name, state=MigrationState.READY)
        deadline = time.monotonic() + READY_WAIT
        while True:
            next_round = time.monotonic() + READY_ROUNDS
            while time.monotonic() < next_round:  # asked often: the handover starts at once
                volume = await self.catalog.volume(name)
                if volume.migration is not None and volume.migration.go:
                    return
                await asyncio.sleep(_GO_POLL)
            if time.monotonic() > deadline:
                raise VolumeBusy(name=name, state=f"ready to hand over and not told to go "
                                 f"within {READY_WAIT:g} s; the source keeps serving")
            await self._round(name, None)

    async def _round(self, name: str, cut: _Cut | None) -> int:
        """One round (tried again when the remote could not be reached); bytes sent."""
        for attempt in range(1, ROUND_TRIES + 1):
            started = time.monotonic()
            try:
                shipped = await self.replication.ship(name, cut,
                                                       cut.copied if cut else None)
            except RemoteUnavailable as e:
                if attempt == ROUND_TRIES or cut is not None:
                    raise
                log.warning("migration of %s: %s; trying again", name, e.message)
                await asyncio.sleep(RETRY_AFTER)
                continue
            seconds = time.monotonic() - started

            figures = {"bytes": float(shipped["bytes"]), "seconds": round(seconds, 3)}

            def counted(m: Migration, figures: dict[str, float] = figures) -> None:
                m.rounds.append(figures)

            await self._record(name, counted)
            return int(shipped["bytes"])
        raise AssertionError("unreachable")

    async def _hand_over(self, name: str, remote: str) -> None:
        cut = _Cut(self, name, remote)
        started = time.monotonic()
        try:
            await self._round(name, cut)
        except CargoholdError as e:
            if cut.fenced:
                raise VolumeBusy(name=name, state=(
                    f"fenced, but its copy on {remote} could not make the last point durable "
                    f"({e.message}): it holds the point before. This one holds it all: "
                    f"'cargohold volume promote {name}' here makes it writable again; then "
                    "migrate again")) from e
            raise
        finally:  # the writes held go, if they have not: taken here again (not fenced)
            if cut.snapshot is not None and cut.let_go is None:
                await self._let_go(cut.snapshot)
        point = cut.snapshot
        assert point is not None and cut.sent is not None
        log.info("migration of %s: last point cut and sent in %.0f ms (of which cut %.0f), "
                 "fenced and let go in %.0f more while the remote made it durable, which "
                 "took %.0f ms more", name, (cut.sent - started) * 1000, (cut.took or 0) * 1000,
                 ((cut.let_go or cut.sent) - cut.sent) * 1000,
                 (time.monotonic() - (cut.let_go or cut.sent)) * 1000)
        late = await self._written_since(point)
        if late:
            raise VolumeBusy(name=name, state=(
                f"fenced, with {len(late)} chunk(s) written after the last point (the engine "
                f"let its writes go before the handover). The remote holds the point "
                f"before them. 'cargohold volume promote {name}' here makes it writable "
                "again; then migrate again"))
        await self._promote(name, remote)
        held = await self._hold_of(point)

        def done(m: Migration) -> None:
            m.state, m.finished, m.held = MigrationState.DONE, time.time(), held

        await self._record(name, done)
        log.info("migration of %s to %s done: writes held %.1f ms", name, remote,
                 held * 1000)

    async def _written_since(self, point: Snapshot) -> list[int]:
        """Chunks any replica of the (fenced) source holds newer than ``point``."""
        volume = await self.catalog.volume(point.volume)
        servers = {s.id: s for s in await self.catalog.servers()}
        late: set[int] = set()
        for replica in volume.in_sync():
            kept = point.model_copy(update={"servers": [replica.server]})
            async with contextlib.AsyncExitStack() as stack:
                reader = await snapshot_reader(kept, servers, self.replication.access, stack)
                late.update(await reader.snapshot_diff(volume.id, point.id, ""))
        return sorted(late)

    async def _promote(self, name: str, remote: str) -> None:
        error: CargoholdError | None = None
        for _ in range(PROMOTE_TRIES):
            try:
                async with await self.replication.remotes.open(remote) as cluster:
                    await cluster.request("POST", f"/v1/volumes/{name}/promote")
                return
            except RemoteUnavailable as e:
                error = e
                await asyncio.sleep(1.0)
        raise VolumeBusy(name=name, state=(
            f"fenced, and its copy on {remote} holds the last point whole but could not be "
            f"promoted ({error.message if error else '?'}). Promote it there ('cargohold "
            f"volume promote {name}' on {remote}), or make this one writable again "
            f"('cargohold volume promote {name}' here)"))

    async def _let_go(self, point: Snapshot) -> None:
        """Tell the engine holding the writes of ``point`` to let them go."""
        def release(s: Snapshot) -> Snapshot | None:
            if s.id != point.id or s.phase != "handover":
                return None
            s.phase = "release"
            return s

        with contextlib.suppress(CargoholdError):
            await self.catalog.update_snapshot(point.volume, point.name, release)

    async def _hold_of(self, point: Snapshot) -> float:
        """How long the engine held the writes (it records it once it let them go)."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            found = await self.catalog.find_snapshot(point.volume, point.name)
            if found is None or found.id != point.id:
                break
            if found.phase == "released" or not found.node:
                return found.held
            await asyncio.sleep(0.05)
        return point.held

    async def _record(self, name: str, change: Callable[[Migration], None] | None = None,
                      state: MigrationState | None = None) -> None:
        def record(v: Volume) -> Volume | None:
            if v.migration is None:
                return None
            if state is not None:
                v.migration.state = state
            if change is not None:
                change(v.migration)
            return v

        await self.catalog.update_volume(name, record)

    async def _failed(self, name: str, reason: str) -> None:
        def failed(m: Migration) -> None:
            m.state, m.error, m.finished = MigrationState.FAILED, reason, time.time()

        with contextlib.suppress(CargoholdError):
            await self._record(name, failed)


class _Cut:
    """The handover's cut: a point with the engine's writes held after it, and what is done
    once the point is all sent (``copied``): the source is fenced and the writes are let go
    (refused from then on), while the remote makes the point durable. Nothing acknowledged
    is then at risk: the source holds the point durably (the cut flushed it), and the remote
    is promoted only once it holds it durably too."""

    def __init__(self, migrations: MigrationService, name: str, remote: str) -> None:
        self.migrations = migrations
        self.name = name
        self.remote = remote
        self.snapshot: Snapshot | None = None
        self.took: float | None = None
        self.sent: float | None = None
        self.let_go: float | None = None
        self.fenced = False

    async def copied(self) -> None:
        self.sent = time.monotonic()
        assert self.snapshot is not None
        moved = time.strftime("%Y-%m-%d %H:%M:%S")
        await self.migrations.replication.fence(self.name,
                                                f"migrated to {self.remote} at {moved}")
        self.fenced = True
        await self.migrations._let_go(self.snapshot)
        self.let_go = time.monotonic()

    async def __call__(self, name: str, snapshot: str) -> Snapshot:
        started = time.monotonic()
        self.snapshot = await self.migrations.snapshots.create(name, snapshot, handover=True)
        self.took = time.monotonic() - started
        if self.snapshot.state is not SnapshotState.READY:
            raise InvalidArgument(what="snapshot", detail=f"{snapshot} is {self.snapshot.state}")
        return self.snapshot

