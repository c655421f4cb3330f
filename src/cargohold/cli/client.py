"""The commands that talk to a node's API: their dispatch, and the volume commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from cargohold.cli.backups import backup_command
from cargohold.cli.containers import container_command
from cargohold.cli.exits import salvage_status, scrub_status
from cargohold.cli.output import (
    emit,
    print_inspect,
    print_nodes,
    print_volumes,
    scrub_text,
)
from cargohold.cli.progress import drain, rebalance, rebuild
from cargohold.cli.remotes import migrate, promote, remote_command, replicate
from cargohold.cli.snapshots import snapshot_command
from cargohold.config import (
    client_config,
)
from cargohold.core.sizes import format_size
from cargohold.errors import InvalidArgument

if TYPE_CHECKING:
    from cargohold.clients.api import ApiClient

def run_client(args: argparse.Namespace) -> int:
    from cargohold.clients.api import ApiClient

    with ApiClient(client_config(args.host, args.token_file, args.ca)) as api:
        as_json = getattr(args, "output", "table") == "json"
        if args.command == "rebalance":
            return rebalance(api, args.dry_run, args.wait, as_json)
        if args.command == "events":
            for event in api.lines("/v1/events"):
                if event["kind"] == "stream" and not as_json:
                    continue
                print(json.dumps(event) if as_json else
                      f"{time.strftime('%H:%M:%S', time.localtime(event['time']))}  "
                      f"{event['kind']:<10} {event['message']}", flush=True)
            return 0
        if args.command == "node" and args.action == "rm":
            query = "?force=true" if args.force else ""
            removed = api.request("DELETE", f"/v1/nodes/{args.target}{query}")
            emit(removed, as_json, f"{args.target} removed; "
                  f"{removed['replicas_to_rebuild']} replica(s) to rebuild elsewhere")
            return 0
        if args.command == "node" and args.action == "drain":
            return drain(api, args.target, args.cancel, args.wait, as_json)
        if args.command == "node":
            print_nodes(api.request("GET", "/v1/nodes"), as_json)
            return 0
        if args.command == "snapshot":
            return snapshot_command(api, args, as_json)
        if args.command == "backup":
            return backup_command(api, args, as_json)
        if args.command == "remote":
            return remote_command(api, args, as_json)
        if args.command == "container":
            return container_command(api, args, as_json)
        name: str = getattr(args, "name", "")
        if args.action == "create" and args.source:
            volume = clone(api, args)
            emit(volume, as_json, f"{volume['name']} (from {volume['source']}"
                  f"{', filling in the background' if volume.get('origin') else ''})")
        elif args.action == "create":
            if not args.size:
                raise InvalidArgument(what="--size", detail="a new volume needs a size")
            body = {"name": args.name, "size": args.size, "replicas": args.replicas or "2",
                    "fs": args.fs, "encrypt": args.encrypt, "locality": args.locality}
            if args.key_file:
                body["key"] = volume_key(args.key_file)
            volume = api.request("POST", "/v1/volumes", body)
            emit(volume, as_json, f"{volume['name']}")
        elif args.action == "resize":
            volume = api.request("POST", f"/v1/volumes/{name}/resize", {"size": args.size})
            emit(volume, as_json, f"{volume['name']} {format_size(volume['size'])}")
        elif args.action == "ls":
            print_volumes(api.request("GET", "/v1/volumes"), as_json)
        elif args.action == "inspect":
            print_inspect(api.request("GET", f"/v1/volumes/{name}"), as_json)
        elif args.action == "attach":
            volume = api.request("POST", f"/v1/volumes/{name}/attach")
            emit(volume, as_json, volume["attachment"]["mountpoint"])
        elif args.action == "detach":
            force = "?force=true" if args.force else ""
            emit(api.request("POST", f"/v1/volumes/{name}/detach{force}"), as_json, name)
        elif args.action == "rebuild":
            return rebuild(api, name, args.wait, as_json)
        elif args.action == "update":
            api.request("PATCH", f"/v1/volumes/{name}", {
                k: v for k, v in (("replicas", args.replicas), ("locality", args.locality))
                if v is not None})
            return rebuild(api, name, args.wait, as_json)
        elif args.action == "move":
            api.request("POST", f"/v1/volumes/{name}/move", {"to": args.to})
            return rebuild(api, name, args.wait, as_json)
        elif args.action == "replicate":
            return replicate(api, args, as_json)
        elif args.action == "migrate":
            return migrate(api, args, as_json)
        elif args.action == "promote":
            return promote(api, name, as_json)
        elif args.action == "activate":
            volume = api.request("POST", f"/v1/volumes/{name}/activate")
            emit(volume, as_json, f"{name} is a volume of its own now")
        elif args.action == "revert":
            volume = api.request("POST", f"/v1/volumes/{name}/revert", {"to": args.to})
            emit(volume, as_json, f"{name} is {args.to} again")
        elif args.action == "scrub":
            report = api.request("POST", f"/v1/volumes/{name}/scrub")
            emit(report, as_json, scrub_text(report))
            return scrub_status(report)
        elif args.action == "salvage":
            done = api.request("POST", f"/v1/volumes/{name}/salvage")
            emit(done, as_json, f"{name}: the copy on data server {done['in_sync']} is in sync "
                  f"again; {done['chunks_newer_elsewhere']} chunk(s) newer on another copy; "
                  f"unreachable: {', '.join(done['unreachable']) or 'none'}")
            return salvage_status(done)
        elif args.action == "rm":
            api.request("DELETE", f"/v1/volumes/{name}")
            emit({"name": name, "removed": True}, as_json, name)
    return 0


def clone(api: ApiClient, args: argparse.Namespace) -> Any:
    """Create a clone (usable at once); with ``--wait``, show how much of its source is
    copied (on stderr) until it depends on it no more."""
    volume = api.request("POST", "/v1/clones", {
        "name": args.name, "from": args.source, "size": args.size, "replicas": args.replicas})
    if not args.wait:
        return volume
    while volume.get("origin"):
        filled = float(volume.get("filled", 0.0))
        print(f"\rfilling {args.name} [{'#' * int(30 * filled):<30}] {filled * 100:3.0f}%",
              end="", file=sys.stderr, flush=True)
        time.sleep(1)
        volume = api.request("GET", f"/v1/volumes/{args.name}")
    print(f"\rfilling {args.name} [{'#' * 30}] done", file=sys.stderr)
    return volume


def volume_key(path: str) -> str:
    from cargohold.core.cipher import read_key

    try:
        with open(path, "rb") as f:
            return read_key(f.read(1024)).hex()
    except OSError as e:
        raise InvalidArgument(what="--key-file", detail=f"{path}: {e.strerror or e}") from None
