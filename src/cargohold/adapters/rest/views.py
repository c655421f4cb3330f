"""What the API shows of the cluster's records: volumes (with their replicas' places and
health, a replication's lag) and nodes."""

from __future__ import annotations

import time
from typing import Any

from cargohold.core.models import DataServer, Node, Volume
from cargohold.services.replication import lag
from cargohold.services.standbys import standby_state


def health(last_seen: float, stale_after: float, alive: bool = True) -> str:
    """up: lease alive and seen lately; suspect: one of the two; down: neither."""
    recent = time.time() - last_seen <= stale_after
    if alive and recent:
        return "up"
    return "suspect" if alive or recent else "down"


def volume_view(volume: Volume, servers: dict[str, DataServer],
                usage: dict[str, Any] | None = None) -> dict[str, Any]:
    view = volume.model_dump(mode="json")
    for replica in view["replicas"]:
        server = servers.get(replica["server"])
        replica["node"] = server.node if server else None
        replica["address"] = server.address if server else None
        replica["path"] = server.path if server else None
        if usage is not None:
            replica["used"] = usage.get(replica["server"])
    view["in_sync"] = len(volume.in_sync())
    view["encryption"] = volume.encryption["cipher"] if volume.encryption else None
    if view["replication"] is not None:
        view["replication"]["lag"] = lag(volume)
    view["standby_state"] = standby_state(volume)
    if usage is not None:
        view["used"] = max((u for u in usage.values() if u is not None), default=None)
    return view


def node_view(node: Node, servers: list[DataServer], stale_after: float,
              alive: bool) -> dict[str, Any]:
    view = node.model_dump(mode="json")
    view["health"] = health(node.last_seen, stale_after, alive)
    view["lease"] = "alive" if alive else "expired"
    view["data_servers"] = [
        {**s.model_dump(mode="json"),
         "health": "up" if s.state.value == "up" and health(s.last_seen, stale_after) == "up"
         else "down"}
        for s in servers if s.node == node.name
    ]
    view["capacity"] = sum(s.capacity for s in servers if s.node == node.name)
    view["free"] = sum(s.free for s in servers if s.node == node.name)
    view["used"] = sum(s.used for s in servers if s.node == node.name)
    view["provisioned"] = sum(s.provisioned for s in servers if s.node == node.name)
    return view
