"""Locality: an attached volume's data on the node that uses it, and planned moves.

A volume attached on a node that holds none of its replicas reads everything over the
network. With locality ``best-effort`` (the default) or ``strict`` the controller moves one
replica there once the volume has been attached for ``SETTLE`` seconds (a short attachment
moves nothing): a replacement (:mod:`.rebuild`) placed on a data server of the attaching
node, filled by the engine while the volume is in use (at ``--rebuild-rate``), after which
the replica it replaces, on another node, is dropped. Redundancy never goes down: the new
copy is an extra one until it is in sync. The engine's local reader then serves reads from
the local copy. A volume that is degraded, resyncing or already rebuilding waits: those come
first. ``strict`` also refuses an attach on a node with no data server that could hold a
replica (``Agent.attach``); ``off`` leaves replicas where placement put them.

``move`` is the same step on request (``cargohold volume move NAME --to NODE``): a replica
prepared on a node before its consumer moves there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cargohold.core import placement
from cargohold.core.models import DataServer, Locality, ReplicaState, Volume, VolumeState
from cargohold.errors import CargoholdError, NodeNotFound, NotLocal, VolumeBusy
from cargohold.services.controller.rebuild import Rebuild
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

#: Seconds before a move that failed (no room on the node, say) is tried again.
RETRY_AFTER = 60.0
#: Seconds a volume stays attached on a node before a replica is moved there.
SETTLE = 10.0


@dataclass(frozen=True)
class Moved:
    volume: str
    source: str  # data server ids: the replica replaced, and its replacement
    target: str


class LocalityKeeper:
    def __init__(self, catalog: Catalog, rebuild: Rebuild) -> None:
        self.catalog = catalog
        self.rebuild = rebuild
        self._refused: dict[str, float] = {}  # volume → when a move may be tried again

    async def run_once(self) -> list[Moved]:
        """Start a move for every attached volume that wants its data local and has none on
        its node; return the moves started."""
        servers = {s.id: s for s in await self.catalog.servers()}
        started = []
        for volume in await self.catalog.volumes():
            att = volume.attachment
            if (volume.locality is Locality.OFF or att is None
                    or volume.state is not VolumeState.ATTACHED
                    or placement.holds_replica_on(volume, servers, att.node)):
                continue
            if (any(r.replaces for r in volume.replicas)
                    or len(volume.in_sync()) < volume.replica_count):
                continue  # a rebuild or resync first
            if not any(s.node == att.node for s in servers.values()):
                continue  # nowhere to go (strict refuses such an attach)
            if time.time() - att.since < SETTLE or \
                    time.monotonic() < self._refused.get(volume.name, 0.0):
                continue  # a short attachment (a job, a check) moves nothing
            try:
                moved = await self.move(volume.name, att.node,
                                        f"moving here: attached on node {att.node}")
            except CargoholdError as e:  # no room there, say: try again in a while
                log.warning("locality: cannot move a replica of %s to node %s: %s",
                            volume.name, att.node, e)
                self._refused[volume.name] = time.monotonic() + RETRY_AFTER
                continue
            if moved is not None:
                started.append(moved)
        return started

    async def move(self, name: str, node: str, why: str) -> Moved | None:
        """Start moving one replica of ``name`` onto a data server of ``node``; None when a
        replica is there already (or on its way). ``NotLocal`` when no data server of
        ``node`` can take it."""
        volume = await self.catalog.volume(name)
        servers = {s.id: s for s in await self.catalog.servers_for_placement()}
        if not any(s.node == node for s in servers.values()) and \
                node not in {n.name for n in await self.catalog.nodes()}:
            raise NodeNotFound(name=node)
        on_node = [r.server for r in volume.replicas
                   if (s := servers.get(r.server)) is not None and s.node == node]
        if on_node and all(any(r.replaces == sid for r in volume.replicas) for sid in on_node):
            raise VolumeBusy(name=name, state=f"moving its replica off node {node}")
        if on_node:
            return None
        holders = {r.server for r in volume.replicas}
        draining = await self.catalog.draining_servers()
        candidates = [s for s in servers.values()
                      if s.node == node and s.id not in holders and s.id not in draining]
        if not candidates:
            raise NotLocal(name=name, node=node)
        [target] = placement.place(candidates, 1, volume.size)
        source = _leaving(volume, servers)
        new = await self.rebuild.replace(name, source, why, to=target.id)
        if not new:
            return None
        log.info("moving the replica of %s on %s to %s (node %s)", name, source, new, node)
        return Moved(name, source, new)


def _leaving(volume: Volume, servers: dict[str, DataServer]) -> str:
    """The replica that makes room: one out of sync if any, else one away from where the
    volume is attached (its consumer reads that one), on the fullest data server."""
    def fullness(server_id: str) -> float:
        s = servers.get(server_id)
        return 2.0 if s is None else (1.0 - s.free / s.capacity if s.capacity else 1.0)

    used_on = volume.attachment.node if volume.attachment is not None else ""
    stale = [r for r in volume.replicas if r.state is not ReplicaState.IN_SYNC]
    away = [r for r in volume.replicas
            if (s := servers.get(r.server)) is None or s.node != used_on]
    pool = stale or away or volume.replicas
    return max(pool, key=lambda r: (fullness(r.server), r.server)).server
