"""The commands between clusters: ``remote``, ``volume replicate``, ``volume migrate`` and
``volume promote``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cargohold.cli.output import (
    emit,
    migration_text,
    print_inspect,
    replication_text,
    table,
)
from cargohold.errors import InvalidArgument

if TYPE_CHECKING:
    from cargohold.clients.api import ApiClient


def remote_command(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    if args.action == "add":
        body = {"name": args.name, "endpoint": args.endpoint,
                "token": _read(args.remote_token, "--token-file").strip(),
                "ca": _read(args.remote_ca, "--ca") if args.remote_ca else ""}
        added = api.request("POST", "/v1/remotes", body)
        emit(added, as_json, f"{added['name']}: cluster {added['cluster']} at "
                             f"{added['endpoint']}")
    elif args.action == "ls":
        found = api.request("GET", "/v1/remotes")
        if as_json:
            print(json.dumps(found, indent=2))
        else:
            print(table([[r["name"], r["endpoint"], r["cluster"],
                          "own CA" if r["ca"] else "system CAs"] for r in found],
                        ["NAME", "ENDPOINT", "CLUSTER", "TLS"]))
    elif args.action == "rm":
        api.request("DELETE", f"/v1/remotes/{args.name}")
        emit({"name": args.name, "removed": True}, as_json, args.name)
    return 0


def replicate(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    name = args.name
    if args.off:
        volume = api.request("DELETE", f"/v1/volumes/{name}/replication")
        emit(volume, as_json, f"{name}: not replicated any more (the remote keeps its "
                              "standby)")
        return 0
    if args.to:
        volume = api.request("PUT", f"/v1/volumes/{name}/replication",
                             {"to": args.to, "every": args.every})
    elif args.now or args.wait:
        volume = api.request("GET", f"/v1/volumes/{name}")
    else:
        raise InvalidArgument(what="volume replicate", detail="say --to REMOTE (or --now, "
                              "--wait, --off for a replicated volume)")
    rep = volume.get("replication")
    if rep is None:
        raise InvalidArgument(what="volume", detail=f"{name!r} is not replicated (--to "
                              "REMOTE)")
    before, failed_before = rep["point"], rep["last_failed"]
    if args.now or (args.wait and before and not args.to):
        volume = api.request("POST", f"/v1/volumes/{name}/replication/now")
    if args.wait:
        volume = _follow(api, name, before, failed_before)
    if as_json:
        print(json.dumps(volume, indent=2))
    else:
        print(replication_text(volume["replication"]))
    failed = args.wait and volume["replication"]["point"] == before
    return 1 if failed else 0


def _follow(api: ApiClient, name: str, before: str, failed_before: float) -> dict[str, Any]:
    """Show the copy's progress (on stderr) until the remote holds a newer point, or a round
    failed."""
    while True:
        volume = api.request("GET", f"/v1/volumes/{name}")
        rep = volume["replication"]
        if rep is None or volume.get("fenced_by"):
            break
        if rep["point"] != before:
            break
        if rep["last_failed"] > failed_before:  # the node's clock, not this host's
            break
        done = float(rep.get("progress", 0.0))
        state = "sending" if rep["sending"] else "waiting for the controller"
        print(f"\rcopying {name} [{'#' * int(30 * done):<30}] {done * 100:3.0f}%  {state}",
              end="", file=sys.stderr, flush=True)
        time.sleep(0.5)
    ok = rep is not None and rep["point"] != before
    end = "done" if ok else f"failed: {rep['last_error'] if rep else volume.get('fenced_by')}"
    print(f"\rcopying {name} [{'#' * 30}] {end}{' ' * 30}", file=sys.stderr)
    return volume


def migrate(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    name = args.name
    volume = api.request("POST", f"/v1/volumes/{name}/migrate", {"to": args.to})
    while args.wait and volume["migration"]["state"] in ("copying", "ready", "handover"):
        moving = volume["migration"]
        rep = volume.get("replication") or {}
        done = float(rep.get("progress", 0.0)) if rep.get("sending") else 0.0
        print(f"\rmigrating {name} to {args.to}: {moving['state']}, round "
              f"{len(moving['rounds']) + 1} [{'#' * int(30 * done):<30}] {done * 100:3.0f}%",
              end="", file=sys.stderr, flush=True)
        time.sleep(0.3)
        volume = api.request("GET", f"/v1/volumes/{name}")
    if args.wait:
        print(file=sys.stderr)
    if as_json:
        print(json.dumps(volume, indent=2))
    else:
        print(migration_text(volume["migration"]))
    return 1 if args.wait and volume["migration"]["state"] == "failed" else 0


def promote(api: ApiClient, name: str, as_json: bool) -> int:
    volume = api.request("POST", f"/v1/volumes/{name}/promote")
    if as_json:
        print(json.dumps(volume, indent=2))
        return 0
    came = volume.get("promoted_from")
    print(f"{name} is writable" + (f" (point {came['point']} of {came['volume']}; copies "
                                   "from there are refused from now on)" if came else ""))
    print_inspect(volume, False)
    return 0


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise InvalidArgument(what=what, detail=f"{path}: {e.strerror or e}") from None
