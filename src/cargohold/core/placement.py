"""Choosing the data servers that hold a volume's replicas (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cargohold.core.models import DataServer, ServerState, Volume
from cargohold.core.sizes import format_size
from cargohold.errors import NotEnoughDataServers, OverProvisioned


def holds_replica_on(volume: Volume, servers: dict[str, DataServer], node: str) -> bool:
    """Whether one of ``volume``'s replicas (in sync or on its way) lies on ``node``."""
    return any((s := servers.get(r.server)) is not None and s.node == node
               for r in volume.replicas)


def place(
    servers: Sequence[DataServer],
    count: int,
    size: int,
    exclude: Iterable[str] = (),
) -> list[DataServer]:
    """Pick ``count`` data servers for the replicas of a ``size``-byte volume.

    With several nodes in the cluster the replicas go to distinct nodes; on a single node
    they go to distinct data servers. Servers with the most free space come first, so the
    pool fills evenly. ``exclude`` names servers (and their nodes) that already hold a replica.
    A server whose thin-provisioned total would pass its over-provisioning limit
    (``max_provisioned``) is left out; when that is why placement fails, the error says so.
    So is a server down to its space reserve (its new chunks are refused).
    """
    excluded = set(exclude)
    taken_nodes = {s.node for s in servers if s.id in excluded}
    candidates = [
        s
        for s in servers
        if s.state is ServerState.UP and s.id not in excluded and s.free > s.reserve
    ]
    usable = [s for s in candidates
              if not s.max_provisioned or s.provisioned + size <= s.max_provisioned]
    usable.sort(key=lambda s: (-(s.free - s.provisioned), s.id))
    distinct_nodes = len({s.node for s in servers}) > 1
    where = " on distinct nodes" if distinct_nodes else ""
    chosen = _spread(usable, taken_nodes, distinct_nodes)
    if len(chosen) < count:
        if len(_spread(candidates, taken_nodes, distinct_nodes)) >= count:
            full = [s for s in candidates if s not in usable]
            limits = ", ".join(f"{s.id[:12]}: {format_size(s.provisioned)} of "
                               f"{format_size(s.max_provisioned)} provisioned" for s in full)
            raise OverProvisioned(replicas=count, size=format_size(size),
                                  available=len(chosen), where=where, limits=limits)
        raise NotEnoughDataServers(replicas=count, available=len(chosen), where=where)
    return chosen[:count]


def _spread(servers: list[DataServer], taken: set[str], distinct_nodes: bool
            ) -> list[DataServer]:
    """The servers that could take a replica each, one per node when ``distinct_nodes``."""
    if not distinct_nodes:
        return servers
    nodes = set(taken)
    chosen = []
    for server in servers:
        if server.node not in nodes:
            chosen.append(server)
            nodes.add(server.node)
    return chosen
