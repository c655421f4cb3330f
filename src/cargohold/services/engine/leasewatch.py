"""An engine's watch on its node's lease, in clusters of several hosts.

Once the node's lease is gone, the controller may attach the volume on another host; the
new engine fences the replicas, so the old one can do no harm, but a host cut off from the
others would otherwise keep its writers waiting (in an fsync, say) until the network came
back. So the engine checks the node's liveness key every second and, once the key is gone
or nothing has confirmed it for a whole lease TTL, fails every I/O at once
(``ReplicaSet.lose_lease``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cargohold.errors import CargoholdError, LeaseLost
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between checks


class LeaseWatch:
    def __init__(self, catalog: Catalog, node: str, ttl: float,
                 on_lost: Callable[[LeaseLost], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog = catalog
        self.node = node
        self.ttl = ttl
        self.on_lost = on_lost
        self.clock = clock
        self.confirmed = clock()  # the node held its lease when it started this engine

    async def run_once(self) -> None:
        """Check once; ``LeaseLost`` (after ``on_lost``) when the lease is gone."""
        try:
            alive = await asyncio.wait_for(self.catalog.node_alive(self.node),
                                           max(INTERVAL, self.ttl / 3))
        except (CargoholdError, TimeoutError) as e:
            silent = self.clock() - self.confirmed
            why = str(e) or "the metadata store does not answer"
            if silent <= self.ttl:
                log.warning("node %s's lease not confirmed for %.1f s: %s", self.node, silent,
                            why)
                return
            self._lose(f"not confirmed for {silent:.0f} s, past its {self.ttl:g} s TTL: {why}")
        if alive:
            self.confirmed = self.clock()
            return
        self._lose("it expired")

    def _lose(self, detail: str) -> None:
        error = LeaseLost(node=self.node, detail=detail)
        self.on_lost(error)
        raise error
