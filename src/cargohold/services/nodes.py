"""Removing a node from the cluster for good (``cargohold node rm``).

A node is removed once it is down (its lease expired: a live node would register again).
Its data servers go with it. Replicas still recorded on them make the removal refuse,
unless forced: then the controller rebuilds each of them at once from the volume's other
in-sync copies (``services.rebuild``: "its data server was removed"). Even forced, a removal
that would leave a volume without any in-sync copy is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cargohold.core.models import ReplicaState
from cargohold.errors import LastCopy, NodeAlive, NodeHoldsReplicas, NodeNotFound
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)


@dataclass
class Removed:
    name: str
    data_servers: list[str]
    replicas_to_rebuild: int


class NodeRemoval:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def remove(self, name: str, force: bool = False) -> Removed:
        if name not in {n.name for n in await self.catalog.nodes()}:
            raise NodeNotFound(name=name)
        if await self.catalog.node_alive(name):
            raise NodeAlive(name=name)
        servers = {s.id for s in await self.catalog.servers() if s.node == name}
        held: list[str] = []
        last: list[str] = []
        for volume in await self.catalog.volumes():
            here = [r for r in volume.replicas if r.server in servers]
            if not here:
                continue
            held.append(volume.name)
            if not any(r.state is ReplicaState.IN_SYNC and r.server not in servers
                       for r in volume.replicas):
                last.append(volume.name)
        if last:
            raise LastCopy(name=name, volumes=", ".join(sorted(last)))
        if held and not force:
            raise NodeHoldsReplicas(name=name, count=len(held), volumes=", ".join(sorted(held)))
        removed = await self.catalog.remove_node(name)
        log.warning("node %s removed with its data servers %s; %d replica(s) to rebuild",
                    name, removed, len(held))
        return Removed(name, removed, len(held))
