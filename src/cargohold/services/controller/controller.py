"""The controller: cluster-wide housekeeping, done by exactly one node at a time.

Leadership is one key, ``controller/leader``, bound to the holder's node lease: a node that
creates it while it is absent leads until that lease ends, and the others keep trying each
period. The leader acts only while its lease is known to be valid: ``renewed`` records each
successful keepalive, and once the lease's time-to-live has passed without one the controller
stops acting at once, before its next write (another node may already lead).

Duties (each pass is :meth:`Controller.run_once`, so tests converge without sleeping):
- data servers whose node's lease has expired are marked down, so placement avoids them and
  ``volume inspect`` shows which replicas are out of reach; the node marks them up again
  when it returns;
- replicas whose data server has been down longer than ``rebuild_after`` seconds, or
  was removed, or whose node is draining, get a replacement on another data server
  (:mod:`cargohold.services.controller.rebuild`), dropped only once the replacement is in sync;
- with ``auto_rebalance``, replicas move (the same way) until every data server holds
  about as many (:mod:`cargohold.services.controller.rebalance`);
- out-of-sync replicas of detached volumes whose data server is up again are resynced
  (only the chunks they missed are copied, see :mod:`cargohold.services.controller.resync`; an
  attached volume's engine does this itself, see :mod:`cargohold.services.engine.healer`);
- creates that never finished (their node died half way) are rolled back, and replicas
  left behind by removals are deleted once their data server answers;
- clones are filled from their source snapshots in the background
  (:mod:`cargohold.services.controller.fill`);
- scheduled backups are started when due, older ones removed past the count kept
  (:mod:`cargohold.services.schedules`), and backup blocks no backup references any more
  are deleted once no backup runs, when a removal left that pending; standby restores
  take the newest backup of the volume they follow;
- with ``scrub_every`` set, a detached volume not scrubbed for that long is scrubbed
  (:mod:`cargohold.services.controller.scrub`), one a pass, at most ``scrub_rate`` bytes per second.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cargohold.clients.access import Access
from cargohold.core.models import ServerState
from cargohold.core.periodic import Periodic
from cargohold.errors import LeaseExpired
from cargohold.services.controller.fill import Fill
from cargohold.services.controller.locality import LocalityKeeper
from cargohold.services.controller.rebalance import Rebalance
from cargohold.services.controller.rebuild import Rebuild
from cargohold.services.controller.resync import Resync
from cargohold.services.controller.scrub import Scrub
from cargohold.services.replication import ReplicationService
from cargohold.services.restores import RestoreService
from cargohold.services.schedules import BackupSchedules
from cargohold.services.snapshots import SnapshotService
from cargohold.services.volumes import VolumeService
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import Compare, MetadataStore, Put

log = logging.getLogger(__name__)

LEADER_KEY = "controller/leader"


class Controller:
    def __init__(self, store: MetadataStore, catalog: Catalog, volumes: VolumeService,
                 node: str, rebuild_after: float = 600.0, scrub_every: float = 0.0,
                 scrub_rate: float = 0.0, auto_rebalance: bool = False,
                 rebuild_rate: float = 0.0, access: Access | None = None,
                 schedules: BackupSchedules | None = None,
                 restores: RestoreService | None = None,
                 replication: ReplicationService | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.volumes = volumes
        self.resync = Resync(catalog, rebuild_rate, access)
        self.rebuild = Rebuild(catalog, rebuild_after, access)
        self.scrub = Scrub(catalog, scrub_rate, access)
        self.rebalance = Rebalance(catalog, self.rebuild)
        self.locality = LocalityKeeper(catalog, self.rebuild)
        self.fill = Fill(catalog, SnapshotService(catalog, access), rebuild_rate, access)
        self.schedules = schedules
        self.restores = restores
        self.replication = replication
        self.auto_rebalance = auto_rebalance
        self.scrub_every = scrub_every
        self.node = node
        self.lease = 0
        self._valid_until = 0.0  # monotonic time until which our lease surely holds
        self._elected = False

    @property
    def leading(self) -> bool:
        return self._elected and time.monotonic() < self._valid_until

    @property
    def lease_held(self) -> bool:
        """Whether the node's lease surely holds now (renewed within its TTL)."""
        return bool(self.lease) and time.monotonic() < self._valid_until

    def renewed(self, lease: int, ttl: float, at: float) -> None:
        """The node's lease ``lease`` was granted or kept alive at ``at`` (monotonic) for
        ``ttl`` seconds."""
        if lease != self.lease:
            self.lease, self._elected = lease, False
        self._valid_until = at + ttl

    def resign(self) -> None:
        """The lease is lost (or the node stops): act no more."""
        if self._elected:
            log.warning("node %s is no longer the controller", self.node)
        self._elected = False
        self._valid_until = 0.0

    async def campaign(self) -> bool:
        """Become the controller if nobody is; return whether this node leads."""
        if not self.lease or time.monotonic() >= self._valid_until:
            self.resign()
            return False
        try:
            result = await self.store.txn([Compare.absent(LEADER_KEY)],
                                          [Put(LEADER_KEY, self.node.encode(), lease=self.lease)])
        except LeaseExpired:  # the node finds out on its next keepalive
            self.resign()
            return False
        if result.succeeded:
            log.info("node %s is now the controller", self.node)
            self._elected = True
        else:
            holder = await self.store.get(LEADER_KEY)
            elected = holder is not None and holder.lease == self.lease
            if self._elected and not elected:
                self.resign()
            self._elected = elected
        return self.leading

    async def leader(self) -> str:
        """The node that holds the controller lease ('' when none does)."""
        holder = await self.store.get(LEADER_KEY)
        return holder.value.decode() if holder is not None else ""

    async def run_forever(self, interval: float, stop: asyncio.Event) -> None:
        """A pass every ``interval`` seconds until ``stop`` is set (the node runs this beside
        its lease keepalive, never in its way: a resync may copy for minutes)."""
        await Periodic("controller pass", self.run_once, interval,
                       wait_first=True).run_forever(stop)

    async def run_once(self) -> None:
        """One pass of every duty, if this node leads."""
        if not await self.campaign():
            await self.fill.stop()  # the leader fills the clones
            return
        await self.mark_down_servers()
        if self.leading:
            await self.rebuild.run_once()
        if self.leading:
            await self.locality.run_once()
        if self.leading and self.auto_rebalance:
            await self.rebalance.run_once()
        if self.leading:
            await self.resync.run_once()
        if self.leading:
            await self.volumes.collect_abandoned()
        if self.leading:
            await self.volumes.collect_garbage()
        if self.leading:
            await self.volumes.collect_stale_snapshots()
        if self.leading:
            await self.fill.run_once()
        if self.leading and self.schedules is not None:
            await self.schedules.run_once()
        if self.leading and self.schedules is not None:
            await self.schedules.backups.collect_pending()
        if self.leading and self.restores is not None:
            await self.restores.follow_all()
        if self.leading and self.replication is not None:
            await self.replication.run_once()
        if self.leading and self.scrub_every > 0:
            await self.scrub.run_once(self.scrub_every)

    async def mark_down_servers(self) -> list[str]:
        """Mark down the data servers of nodes whose lease has expired; return their ids."""
        alive = await self.catalog.live_nodes()
        marked = []
        for server in await self.catalog.servers():
            if server.node in alive or server.state is ServerState.DOWN:
                continue
            if not self.leading:
                break
            server.state = ServerState.DOWN
            await self.catalog.put_server(server)
            log.warning("data server %s of node %s marked down: the node's lease expired",
                        server.id, server.node)
            marked.append(server.id)
        return marked
