"""Choosing the data servers that hold a volume's replicas (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cargohold.core.models import DataServer, ServerState
from cargohold.errors import NotEnoughDataServers


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
    """
    excluded = set(exclude)
    taken_nodes = {s.node for s in servers if s.id in excluded}
    usable = [
        s
        for s in servers
        if s.state is ServerState.UP and s.id not in excluded and s.free > 0
    ]
    usable.sort(key=lambda s: (-(s.free - s.provisioned), s.id))
    nodes = {s.node for s in servers}
    chosen: list[DataServer] = []
    if len(nodes) > 1:
        for server in usable:
            if server.node not in taken_nodes:
                chosen.append(server)
                taken_nodes.add(server.node)
        where = " on distinct nodes"
    else:
        chosen = list(usable)
        where = ""
    if len(chosen) < count:
        raise NotEnoughDataServers(replicas=count, available=len(chosen), where=where)
    return chosen[:count]
