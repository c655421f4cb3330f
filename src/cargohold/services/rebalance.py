"""Rebalance: spread replicas evenly over the data servers (after one joins, say).

The plan moves one replica at a time from the data server holding the most replicas to the
one holding the fewest, while they differ by more than one. A move is a replacement (see
:mod:`cargohold.services.rebuild`): the new copy is added out of sync, filled by the resync,
and the old one dropped only once the new one is in sync, so redundancy never goes down.
Only detached volumes move (their resync needs them detached); a target never already holds
a replica of the volume, nor (with several nodes) sits on a node that does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cargohold.core.models import DataServer, ServerState, Volume, VolumeState
from cargohold.errors import CargoholdError
from cargohold.services.rebuild import Rebuild
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Move:
    volume: str
    source: str  # data server ids
    target: str


class Rebalance:
    def __init__(self, catalog: Catalog, rebuild: Rebuild) -> None:
        self.catalog = catalog
        self.rebuild = rebuild

    async def plan(self) -> list[Move]:
        draining = await self.catalog.draining()
        servers = [s for s in await self.catalog.servers()
                   if s.state is ServerState.UP and s.node not in draining]
        return plan(servers, await self.catalog.volumes())

    async def run_once(self) -> list[Move]:
        """Start the moves of the current plan; return those started."""
        started = []
        for move in await self.plan():
            try:
                if await self.rebuild.replace(move.volume, move.source, "rebalancing",
                                              to=move.target):
                    started.append(move)
            except CargoholdError as e:
                log.warning("rebalance: cannot move %s from %s to %s: %s", move.volume,
                            move.source, move.target, e)
        return started

    async def pending(self) -> int:
        """Replicas still on their way (rebalance or rebuild replacements not yet done)."""
        return sum(1 for v in await self.catalog.volumes() for r in v.replicas if r.replaces)


def plan(servers: list[DataServer], volumes: list[Volume]) -> list[Move]:
    """Moves (at most one per volume) that even out replica counts over ``servers``."""
    usable = {s.id: s for s in servers}
    load = {sid: 0 for sid in usable}
    for volume in volumes:
        for replica in volume.replicas:
            if replica.server in load:
                load[replica.server] += 1
    distinct_nodes = len({s.node for s in servers}) > 1
    moving = {v.name for v in volumes if any(r.replaces for r in v.replicas)}
    movable = [v for v in volumes if v.state is VolumeState.DETACHED and v.attachment is None
               and v.name not in moving]
    moves: list[Move] = []
    while True:
        source = max(load, key=lambda sid: (load[sid], sid), default=None)
        if source is None:
            return moves
        best = None
        for target in sorted(load, key=lambda sid: (load[sid], sid)):
            if load[source] - load[target] <= 1:
                break
            best = _pick(movable, source, target, usable, distinct_nodes)
            if best is not None:
                moves.append(Move(best.name, source, target))
                movable.remove(best)
                load[source] -= 1
                load[target] += 1
                break
        if best is None:
            return moves


def _pick(volumes: list[Volume], source: str, target: str, servers: dict[str, DataServer],
          distinct_nodes: bool) -> Volume | None:
    for volume in volumes:
        holders = {r.server for r in volume.replicas}
        if source not in holders or target in holders:
            continue
        if distinct_nodes:
            nodes = {servers[h].node for h in holders if h in servers and h != source}
            if servers[target].node in nodes:
                continue
        return volume
    return None
