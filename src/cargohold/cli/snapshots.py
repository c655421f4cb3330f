"""The ``snapshot`` commands."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from cargohold.cli.output import (
    emit,
    table,
)
from cargohold.core.sizes import format_size
from cargohold.errors import InvalidArgument

if TYPE_CHECKING:
    from cargohold.clients.api import ApiClient

def snapshot_command(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    from cargohold.core.names import split_snapshot

    if args.action == "ls":
        query = f"?volume={args.volume}" if args.volume else ""
        found = api.request("GET", f"/v1/snapshots{query}")
        if as_json:
            print(json.dumps(found, indent=2))
            return 0
        print(table([[s["ref"], s["state"],
                       time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"])),
                       format_size(s["size"]),
                       "?" if s["unique"] is None else format_size(s["unique"]),
                       str(len(s["servers"]))] for s in found],
                     ["SNAPSHOT", "STATE", "CREATED", "SIZE", "ALONE", "COPIES"]))
        return 0
    if args.action == "create" and args.group:
        group = api.request("POST", "/v1/snapshot-groups", {
            "name": args.group, "volumes": args.refs, "freeze": not args.no_freeze})
        emit(group, as_json, "\n".join(f"{s['ref']} (writes held {s['held'] * 1000:.0f} ms)"
                                        for s in group))
        return 0
    if args.action == "rm" and args.group:
        api.request("DELETE", f"/v1/snapshot-groups/{args.group}")
        emit({"group": args.group, "removed": True}, as_json, args.group)
        return 0
    if args.action == "create" and len(args.refs) != 1:
        raise InvalidArgument(what="snapshot", detail="name one VOLUME@SNAPSHOT (several "
                              "volumes at one instant: --group NAME VOLUME...)")
    volume, name = split_snapshot(args.refs[0] if args.action == "create" else args.ref)
    if args.action == "create":
        taken = api.request("POST", f"/v1/volumes/{volume}/snapshots",
                            {"name": name, "freeze": not args.no_freeze})
        emit(taken, as_json, f"{taken['ref']} (writes held {taken['held'] * 1000:.0f} ms)")
    elif args.action == "rm":
        api.request("DELETE", f"/v1/volumes/{volume}/snapshots/{name}")
        emit({"ref": args.ref, "removed": True}, as_json, args.ref)
    return 0
