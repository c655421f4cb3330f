"""Progress of long operations the controller runs (rebuilds, rebalancing, drains),
shown on stderr until they end."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

from cargohold.cli.output import (
    emit,
    print_inspect,
    table,
)

if TYPE_CHECKING:
    from cargohold.clients.api import ApiClient

def rebuild(api: ApiClient, name: str, wait: bool, as_json: bool) -> int:
    """Replicas are resynced and rebuilt on their own (by the controller while the volume is
    detached, by its engine while attached); this shows it."""
    volume = api.request("GET", f"/v1/volumes/{name}")
    while wait and healing(volume):
        moving = [r for r in volume["replicas"] if r["state"] != "in_sync"]
        done = min((r.get("progress", 0.0) if r["state"] == "resyncing" else 0.0)
                   for r in moving) if moving else 1.0
        bar = "#" * int(30 * done)
        left = (f"{len(moving)} replica(s) to bring in sync" if moving
                else "waiting for the controller")
        print(f"\rrebuilding {name} [{bar:<30}] {done * 100:3.0f}%  {left}", end="",
              file=sys.stderr, flush=True)
        time.sleep(1)
        volume = api.request("GET", f"/v1/volumes/{name}")
    if wait:
        print(f"\rrebuilding {name} [{'#' * 30}] done{' ' * 40}", file=sys.stderr)
    if as_json:
        print(json.dumps(volume, indent=2))
    else:
        print_inspect(volume, False)
    return 0


def healing(volume: dict[str, Any]) -> bool:
    """Some replica is not in sync, is being replaced, or sits on a removed data server
    (``node rm --force``: the controller replaces it on its next pass)."""
    return any(r["state"] != "in_sync" or r.get("replaces") or r.get("node") is None
               for r in volume["replicas"])


def rebalance(api: ApiClient, dry_run: bool, wait: bool, as_json: bool) -> int:
    if dry_run:
        view = api.request("GET", "/v1/rebalance")
        moves = view["plan"]
    else:
        view = api.request("POST", "/v1/rebalance")
        moves = view["started"]
    if wait and not dry_run:
        first = max(view["pending"], 1)
        while view["pending"]:
            bar = "#" * int(30 * (1 - view["pending"] / first))
            print(f"\rrebalancing [{bar:<30}] {view['pending']} replicas moving",
                  end="", file=sys.stderr, flush=True)
            time.sleep(1)
            view = api.request("GET", "/v1/rebalance")
        print(f"\rrebalancing [{'#' * 30}] done{' ' * 20}", file=sys.stderr)
    if as_json:
        print(json.dumps({"moves": moves, "pending": view["pending"]}, indent=2))
    elif moves:
        verb = "would move" if dry_run else "moving"
        print(table([[m["volume"], m["source"][:12], m["target"][:12]] for m in moves],
                     ["VOLUME", "FROM", "TO"]))
        print(f"{len(moves)} replicas {verb}")
    else:
        print("balanced: nothing to move")
    return 0


def drain(api: ApiClient, node: str, cancel: bool, wait: bool, as_json: bool) -> int:
    method = "DELETE" if cancel else "POST"
    view = api.request(method, f"/v1/nodes/{node}/drain")
    if wait and not cancel:
        first = max(view["replicas"], 1)
        while view["replicas"]:
            done = 1 - view["replicas"] / first
            bar = "#" * int(30 * done)
            print(f"\rdraining {node} [{bar:<30}] {view['replicas']} replicas left",
                  end="", file=sys.stderr, flush=True)
            time.sleep(1)
            view = api.request("GET", f"/v1/nodes/{node}")
        print(f"\rdraining {node} [{'#' * 30}] done{' ' * 20}", file=sys.stderr)
    emit(view, as_json, f"{node}: {'draining' if view['draining'] else 'not draining'}, "
                         f"{view['replicas']} replicas on it")
    return 0
