"""Rebuild: replace replicas that are gone for good, or that must move off a draining node.

A replica is replaced when its data server has been down longer than ``down_after``
seconds (or its record is gone: the operator removed it), and when its node is being
drained. The replacement never lowers redundancy:

1. placement picks a new data server (another node when there are several; never one of a
   draining node), the replica is created there empty and added to the volume record out of
   sync, with ``replaces`` naming the data server it stands in for;
2. the resync (:mod:`cargohold.services.controller.resync`) fills it from the in-sync
   replicas, several chunks at a time, and puts it in the in-sync set;
3. only then is the replaced replica dropped from the record and deleted from its data server
   (or written down as garbage while that server is unreachable).

Step 2 runs in the engine when the volume is attached (:mod:`cargohold.services.engine.healer`): the
new replica receives every write while it catches up. An engine lets go of a replica the
record no longer lists (``ReplicaSet.retire``); until it does, its writes to the deleted copy
fail and it leaves that copy, which costs no I/O.
"""

from __future__ import annotations

import logging
import time

from cargohold.clients.access import Access
from cargohold.core import placement
from cargohold.core.models import DataServer, Replica, ReplicaState, ServerState, Volume
from cargohold.errors import CargoholdError, VolumeBusy
from cargohold.services.volumes import ServerSession
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)


class Rebuild:
    def __init__(self, catalog: Catalog, down_after: float,
                 access: Access | None = None) -> None:
        self.catalog = catalog
        self.access = access
        self.down_after = down_after

    async def run_once(self) -> list[tuple[str, str, str]]:
        """Start a replacement for every replica that needs one and drop the replicas whose
        replacement is in sync; return the replacements started (volume, old, new)."""
        servers = {s.id: s for s in await self.catalog.servers()}
        draining = await self.catalog.draining()
        started = []
        for volume in await self.catalog.volumes():
            await self._drop_replaced(volume, servers)
            for replica in volume.replicas:
                why = self._why(replica, volume, servers, draining)
                if not why:
                    continue
                try:
                    new = await self.replace(volume.name, replica.server, why)
                except CargoholdError as e:
                    log.warning("cannot replace the replica of %s on %s: %s", volume.name,
                                replica.server, e)
                    continue
                if new:
                    started.append((volume.name, replica.server, new))
        return started

    def _why(self, replica: Replica, volume: Volume, servers: dict[str, DataServer],
             draining: set[str]) -> str:
        """Why ``replica`` needs a replacement ('' when it does not)."""
        if replica.replaces or any(r.replaces == replica.server for r in volume.replicas):
            return ""  # it is a replacement, or one is already on its way
        server = servers.get(replica.server)
        if server is None:
            return "rebuilding: its data server was removed"
        if server.node in draining:
            return f"rebuilding: node {server.node} is draining"
        if server.state is ServerState.DOWN and time.time() - server.last_seen > self.down_after:
            return (f"rebuilding: its data server has been down for more than "
                    f"{self.down_after:g} s")
        return ""

    async def replace(self, name: str, old: str, why: str, to: str = "") -> str:
        """Add a replacement for the replica of ``name`` on data server ``old`` (on data
        server ``to``, or where placement says); return the new data server's id ('' when a
        replacement already exists)."""
        volume = await self.catalog.volume(name)
        if any(r.replaces == old for r in volume.replicas):
            return ""
        servers = await self.catalog.servers_for_placement()
        exclude = {r.server for r in volume.replicas} | await self.catalog.draining_servers()
        if to:
            servers = [s for s in servers if s.id == to and s.id not in exclude]
            if not servers:
                raise VolumeBusy(name=name, state=f"not movable to data server {to}")
        [target] = placement.place(servers, 1, volume.size, exclude=exclude)
        async with ServerSession(target, self.access) as client:
            await client.create(volume.id, volume.size)

        def add(v: Volume) -> Volume:
            if v.id != volume.id or all(r.server != old for r in v.replicas):
                raise VolumeBusy(name=name, state="changed while its replica was replaced")
            if any(r.replaces == old for r in v.replicas):
                raise VolumeBusy(name=name, state="already rebuilding that replica")
            v.replicas.append(Replica(server=target.id, state=ReplicaState.OUT_OF_SYNC,
                                      reason=why, replaces=old))
            return v

        try:
            await self.catalog.update_volume(name, add)
        except CargoholdError:
            await self.catalog.add_garbage(target.id, volume.id)  # the empty copy goes
            raise
        log.warning("replacing the replica of %s on %s with one on %s (%s)", name, old,
                    target.id, why)
        return target.id

    async def _drop_replaced(self, volume: Volume, servers: dict[str, DataServer]) -> None:
        done = {r.replaces for r in volume.replicas
                if r.replaces and r.state is ReplicaState.IN_SYNC}
        if not done:
            return

        def drop(v: Volume) -> Volume:
            v.replicas = [r for r in v.replicas if r.server not in done]
            for r in v.replicas:
                if r.replaces in done:
                    r.replaces, r.reason = "", ""
            return v

        await self.catalog.update_volume(volume.name, drop)
        await self.catalog.hold_snapshots(volume.name, drop=sorted(done))
        for old in done:
            log.info("replica of %s on %s replaced: deleting it", volume.name, old)
            server = servers.get(old)
            if server is None:
                continue  # its data server was removed: nothing to delete
            try:
                async with ServerSession(server, self.access) as client:
                    await client.delete(volume.id)
            except CargoholdError:
                await self.catalog.add_garbage(old, volume.id)
