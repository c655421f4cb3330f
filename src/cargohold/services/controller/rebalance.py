"""Rebalance: spread replicas evenly over the data servers (after one joins, say).

The plan moves one replica at a time from the data server holding the most replicas to the
one holding the fewest, while they differ by more than one (a server none of whose replicas
can move leaves its turn to the next most loaded one). A move is a replacement (see
:mod:`cargohold.services.controller.rebuild`): the new copy is added out of sync,
filled by the resync, and the old one dropped only once the new one is in sync, so
redundancy never goes down. Only detached volumes move (their resync needs them detached); a
target never already holds a replica of the volume, nor (with several nodes) sits on a node
that does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cargohold.core.models import DataServer, ServerState, Volume, VolumeState
from cargohold.errors import CargoholdError
from cargohold.services.controller.rebuild import Rebuild
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
    """Moves (at most one per volume) that even out replica counts over ``servers``.

    Each step takes the first possible move from the most loaded server to the least
    loaded one; when no replica can leave the most loaded server (each of its volumes
    already has a replica on every lighter server or its node, or would not fit there), the
    next most loaded server gets its turn, so one stuck server does not stop the rest.
    A target takes a volume only within its over-provisioning limit (``max_provisioned``,
    counting the moves planned before) and while it has free space. Each move lowers the
    spread of the counts (source and target differ by two or more), so the plan ends.
    """
    usable = {s.id: s for s in servers}
    load = {sid: 0 for sid in usable}
    for volume in volumes:
        for replica in volume.replicas:
            if replica.server in load:
                load[replica.server] += 1
    provisioned = {s.id: s.provisioned for s in servers}
    distinct_nodes = len({s.node for s in servers}) > 1
    moving = {v.name for v in volumes if any(r.replaces for r in v.replicas)}
    movable = [v for v in volumes if v.state is VolumeState.DETACHED and v.attachment is None
               and v.name not in moving]
    moves: list[Move] = []
    while (move := _next_move(load, movable, usable, provisioned, distinct_nodes)) is not None:
        moves.append(move)
        volume = next(v for v in movable if v.name == move.volume)
        movable.remove(volume)
        load[move.source] -= 1
        load[move.target] += 1
        provisioned[move.target] += volume.size  # the source frees its share only once done
    return moves


def _next_move(load: dict[str, int], movable: list[Volume], servers: dict[str, DataServer],
               provisioned: dict[str, int], distinct_nodes: bool) -> Move | None:
    """The first possible move, trying sources from the most loaded down."""
    lightest = sorted(load, key=lambda sid: (load[sid], sid))
    for source in sorted(load, key=lambda sid: (load[sid], sid), reverse=True):
        for target in lightest:
            if load[source] - load[target] <= 1:
                break  # the targets after this one are no lighter
            volume = _pick(movable, source, target, servers, provisioned, distinct_nodes)
            if volume is not None:
                return Move(volume.name, source, target)
    return None


def _pick(volumes: list[Volume], source: str, target: str, servers: dict[str, DataServer],
          provisioned: dict[str, int], distinct_nodes: bool) -> Volume | None:
    server = servers[target]
    if server.capacity and server.free <= 0:  # full (capacity 0: not reported yet)
        return None
    for volume in volumes:
        holders = {r.server for r in volume.replicas}
        if source not in holders or target in holders:
            continue
        if server.max_provisioned and provisioned[target] + volume.size > server.max_provisioned:
            continue
        if distinct_nodes:
            nodes = {servers[h].node for h in holders if h in servers and h != source}
            if server.node in nodes:
                continue
        return volume
    return None
