"""The ``cargohold`` command line.

Exit codes (borg's scheme): 0 success, 1 warning, 2 error (bad input or anything not
below), 3 not found, 4 conflict with the current state, 5 a service is unavailable,
6 out of space, 7 fenced.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cargohold import __version__
from cargohold.config import (
    DEFAULT_DOCKER_SOCKET,
    DEFAULT_KUBELET_DIR,
    LEASE_TTL,
    Endpoint,
    NodeConfig,
    client_config,
    read_token,
    read_tokens_file,
)
from cargohold.core.sizes import format_size, parse_size
from cargohold.errors import CargoholdError, InvalidArgument, Kind

if TYPE_CHECKING:
    from cargohold.clients.api import ApiClient

EXIT_OK = 0
DEFAULT_PKI_DIR = Path("/var/lib/cargohold/pki")
#: The command did what was asked, but what it found needs a person: a scrub found chunks
#: without a clean copy or could not reach every copy; a salvage left newer chunks or
#: unreachable copies behind.
EXIT_WARNING = 1
EXIT_CODES = {
    Kind.INVALID: 2,
    Kind.INTERNAL: 2,
    Kind.NOT_FOUND: 3,
    Kind.CONFLICT: 4,
    Kind.UNAVAILABLE: 5,
    Kind.NO_SPACE: 6,
    Kind.FENCED: 7,
}


LOCALITY_HELP = ("best-effort (default: a replica is moved to the node it is attached on), "
                 "strict (also: no attach on a node that cannot hold one) or off")

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cargohold", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--host", help="node API: unix:///PATH or tcp://HOST:PORT (HTTPS; "
                        "http://HOST:PORT for a node run with --insecure-plaintext) (default "
                        "$CARGOHOLD_HOST or unix:///run/cargohold/api.sock)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="file holding the bearer token of a TCP API (default "
                             "$CARGOHOLD_TOKEN); never on the command line, where any local "
                             "user can read it")
    parser.add_argument("--ca", metavar="FILE",
                        help="CA certificate to check a TCP API's HTTPS certificate with "
                             "(default $CARGOHOLD_CA, else /var/lib/cargohold/tls/ca.crt if "
                             "present, else the system's)")
    parser.add_argument("--version", action="version", version=f"cargohold {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def output(p: argparse.ArgumentParser) -> None:
        p.add_argument("-o", "--output", choices=("table", "json"), default="table")

    volume = commands.add_parser("volume", help="manage volumes").add_subparsers(
        dest="action", required=True)
    create = volume.add_parser("create", help="create a thin, replicated volume")
    create.add_argument("name")
    create.add_argument("--size", help="512M, 2G, 1T or bytes (with --from: the source's, "
                        "or larger)")
    create.add_argument("--replicas", help="copies on distinct hosts (default 2; with --from: "
                        "the source's)")
    create.add_argument("--from", dest="source", metavar="VOLUME[@SNAPSHOT]",
                        help="a clone: the snapshot's contents, or the volume's current ones")
    create.add_argument("--wait", action="store_true",
                        help="with --from: show progress until the clone is filled (it is "
                             "usable at once, and depends on its source until then)")
    create.add_argument("--fs", default="ext4", help="ext4 (default) or xfs")
    create.add_argument("--locality", default="best-effort", help=LOCALITY_HELP)
    create.add_argument("--encrypt", action="store_true",
                        help="encrypt at rest (AES-256-XTS in the engine: data servers, the "
                             "network and copies hold ciphertext only), with a new random key "
                             "kept by the cluster")
    create.add_argument("--key-file", metavar="FILE",
                        help="the volume key instead (64 bytes, raw or as 128 hex digits; "
                             "implies --encrypt): keep a copy to read the data without the "
                             "cluster")
    output(create)
    resize = volume.add_parser("resize", help="grow a volume (online when attached)")
    resize.add_argument("name")
    resize.add_argument("--size", required=True, help="the new size: 4G, 1T or bytes; "
                        "volumes only grow")
    output(resize)
    output(volume.add_parser("ls", help="list volumes"))
    update = volume.add_parser("update", help="change a volume's replica count (online) "
                               "or locality")
    update.add_argument("name")
    update.add_argument("--replicas", help="1 to 5")
    update.add_argument("--locality", help=LOCALITY_HELP)
    move = volume.add_parser("move", help="prepare a replica on a node (one elsewhere goes)")
    move.add_argument("name")
    move.add_argument("--to", required=True, metavar="NODE")
    move.add_argument("--wait", action="store_true", help="show progress until it is in sync")
    output(move)
    update.add_argument("--wait", action="store_true",
                        help="show progress until the new replicas are in sync")
    output(update)
    revert = volume.add_parser("revert", help="put a detached volume back to a snapshot")
    revert.add_argument("name")
    revert.add_argument("--to", required=True, metavar="VOLUME@SNAPSHOT")
    output(revert)
    for action, text in (("inspect", "show a volume"), ("attach", "attach and mount here"),
                         ("detach", "unmount and detach"), ("rm", "remove a volume"),
                         ("scrub", "read every copy of a volume, repair bad ones"),
                         ("rebuild", "show (or --wait for) the resync/rebuild of its replicas"),
                         ("salvage", "bring back a volume none of whose copies is in sync "
                                     "(the newest copy)"),
                         ("activate", "make a standby restore a volume of its own")):
        sub = volume.add_parser(action, help=text)
        sub.add_argument("name")
        if action == "rebuild":
            sub.add_argument("--wait", action="store_true",
                             help="show progress until every replica is in sync")
        if action == "detach":
            sub.add_argument("--force", action="store_true",
                             help="release a volume attached on a node that is down (refused "
                                  "while that node's lease is alive)")
        output(sub)

    snapshot = commands.add_parser(
        "snapshot", help="point-in-time copies of volumes").add_subparsers(
        dest="action", required=True)
    take = snapshot.add_parser("create", help="take a snapshot (while attached and in use)")
    take.add_argument("refs", nargs="+", metavar="VOLUME@SNAPSHOT",
                      help="with --group: the volumes, cut at one instant")
    take.add_argument("--group", metavar="NAME",
                      help="one snapshot NAME of each volume given, at one instant")
    take.add_argument("--no-freeze", action="store_true",
                      help="do not freeze the mounted file system around the cut (a clone "
                           "then replays its journal when mounted)")
    output(take)
    listing = snapshot.add_parser("ls", help="list snapshots and the space each holds alone")
    listing.add_argument("volume", nargs="?", default="")
    output(listing)
    drop = snapshot.add_parser("rm", help="remove a snapshot and free what only it held")
    drop.add_argument("ref", nargs="?", metavar="VOLUME@SNAPSHOT")
    drop.add_argument("--group", metavar="NAME", help="remove every snapshot of a group")
    output(drop)

    backup = commands.add_parser(
        "backup", help="backups to S3: incremental, deduplicated, compressed, encrypted"
    ).add_subparsers(dest="action", required=True)
    target = backup.add_parser("target", help="where backups go").add_subparsers(
        dest="target_action", required=True)
    setting = target.add_parser("set", help="use an S3 bucket (credentials: the node's AWS "
                                "environment or ~/.aws/credentials)")
    setting.add_argument("url", metavar="s3://BUCKET/PREFIX")
    setting.add_argument("--endpoint", default="", help="an S3-compatible server's URL")
    setting.add_argument("--region", default="")
    setting.add_argument("--encryption-key-file", type=Path,
                         help="at least 32 random bytes: blocks sealed with AES-256-GCM")
    output(setting)
    output(target.add_parser("show", help="the target in use"))
    taking = backup.add_parser("create", help="back a volume up (it stays in use)")
    taking.add_argument("volume")
    taking.add_argument("--snapshot", default="", help="this snapshot (default: one taken now)")
    taking.add_argument("--wait", action="store_true", help="show progress until it is done")
    output(taking)
    listing = backup.add_parser("ls", help="backups (complete, running, failed)")
    listing.add_argument("volume", nargs="?", default="")
    output(listing)
    for verb, text in (("inspect", "a backup's details"),
                       ("job", "a backup's or restore's job: state, progress, error"),
                       ("verify", "fetch every block of a backup and check its hash"),
                       ("rm", "remove a backup and the blocks nothing else references")):
        sub = backup.add_parser(verb, help=text)
        sub.add_argument("id")
        output(sub)
    scheduling = backup.add_parser("schedule", help="back a volume up every so often (run "
                                   "by the controller), keeping the newest")
    scheduling.add_argument("volume")
    scheduling.add_argument("--every", help="30m, 1h, 7d or seconds (at least 60)")
    scheduling.add_argument("--keep", type=int, default=0, help="backups kept (default: all)")
    scheduling.add_argument("--off", action="store_true", help="remove the schedule")
    output(scheduling)
    output(backup.add_parser("schedules", help="the backup schedules"))
    restoring = backup.add_parser("restore", help="restore a backup into a new volume")
    restoring.add_argument("id")
    restoring.add_argument("--to", required=True, metavar="VOLUME")
    restoring.add_argument("--replicas")
    restoring.add_argument("--standby", action="store_true",
                           help="then take each later backup of the same volume; attachable "
                                "only after 'volume activate'")
    restoring.add_argument("--wait", action="store_true", help="show progress until it is done")
    output(restoring)

    rebalance = commands.add_parser(
        "rebalance", help="spread replicas evenly over the data servers (e.g. after adding one)")
    rebalance.add_argument("--dry-run", action="store_true", help="only show the plan")
    rebalance.add_argument("--wait", action="store_true",
                           help="show progress until every move is done")
    output(rebalance)
    output(commands.add_parser("events", help="follow the cluster's state changes"))

    node = commands.add_parser("node", help="run this host's node, or list nodes")
    node.add_argument("--state-dir", type=Path, default=Path("/var/lib/cargohold"))
    node.add_argument("--data-dir", type=Path, action="append", default=[],
                      help="a directory (disk) to serve as a data server; repeatable")
    node.add_argument("--metadata", default="",
                      help="metadata store URL (default sqlite:///STATE_DIR/meta.db)")
    node.add_argument("--api", action="append", default=[],
                      help="unix:///PATH or tcp://HOST:PORT; repeatable")
    node.add_argument("--name", help="node name (default: host name)")
    node.add_argument("--data-host", default="",
                      help="address the data servers listen on (default 127.0.0.1 alone, "
                           "with etcd on other hosts this host's address facing them)")
    node.add_argument("--docker-socket", default=str(DEFAULT_DOCKER_SOCKET),
                      help="where to serve the Docker volume plugin ('none' to disable)")
    node.add_argument("--rebuild-after", type=float, default=600.0,
                      help="seconds a data server may be down before its replicas are "
                           "rebuilt elsewhere (default 600)")
    node.add_argument("--overprovision", type=float, default=2.0,
                      help="thin volumes may provision this many times a data server's "
                           "capacity (default 2; 0: no limit)")
    node.add_argument("--auto-rebalance", action="store_true",
                      help="move replicas onto new data servers without being asked")
    node.add_argument("--no-engine-metrics", dest="engine_metrics", action="store_false",
                      help="engines do not count requests and their latencies (/metrics "
                           "then has no per-volume I/O)")
    node.add_argument("--rebuild-rate", default="0",
                      help="bytes per second resync and rebuild copies may use, e.g. 200M "
                           "(default 0: no limit)")
    node.add_argument("--scrub-every", type=float, default=7 * 86400.0,
                      help="seconds between background scrubs of a detached volume "
                           "(default a week; 0 turns them off)")
    node.add_argument("--scrub-rate", default="50M",
                      help="read rate of background scrubs per second, e.g. 50M (default)")
    node.add_argument("--lease-ttl", type=float, default=LEASE_TTL,
                      help="seconds without renewal after which this node counts as down "
                           f"and its volumes may be taken over (default {LEASE_TTL:g}; 3 or "
                           "more with etcd)")
    node.add_argument("--tokens-file", metavar="FILE",
                      help="named bearer tokens of the TCP API, a line each: NAME ROLE TOKEN "
                           "(ROLE admin or read-only); mode 600")
    node.add_argument("--csi-endpoint", default="none",
                      help="serve the Kubernetes CSI driver on unix:///PATH (default: none)")
    node.add_argument("--csi-kubelet-dir", default=str(DEFAULT_KUBELET_DIR),
                      help="the only directory under which the CSI driver stages and publishes "
                           f"volumes (default {DEFAULT_KUBELET_DIR})")
    node.add_argument("--tls-dir", type=Path,
                      help="this node's TLS files and cluster key, as `pki issue` writes them "
                           "(ca.crt, node.crt, node.key, cluster.key); default STATE_DIR/tls, "
                           "made with a new cluster CA (STATE_DIR/pki) on first start")
    node.add_argument("--tls-ca", type=Path, help="the cluster CA certificate (your own CA)")
    node.add_argument("--tls-cert", type=Path, help="this node's certificate; its common "
                      "name must be the node's name")
    node.add_argument("--tls-key", type=Path, help="this node's private key (mode 600)")
    node.add_argument("--cluster-key", type=Path,
                      help="the secret that signs capabilities, the same file on every node "
                           "(hex, 32 bytes or more; mode 600)")
    node.add_argument("--etcd-password-file", type=Path, metavar="FILE",
                      help="the password (first line; mode 600) of the etcd user named in "
                           "--metadata etcds://USER@HOST:PORT,...")
    node.add_argument("--insecure-plaintext", action="store_true",
                      help="no TLS between hosts and no capabilities on the data path: anyone "
                           "who reaches a data server's port can use it. Never in production")
    node_actions = node.add_subparsers(dest="action")
    output(node_actions.add_parser("ls", help="list nodes and their data servers"))
    remove = node_actions.add_parser(
        "rm", help="remove a node that is down, with its data servers, for good")
    remove.add_argument("target", metavar="NODE")
    remove.add_argument("--force", action="store_true",
                        help="also when it still holds replicas: they are rebuilt elsewhere "
                             "at once from their other copies")
    output(remove)
    drain = node_actions.add_parser(
        "drain", help="move every replica off a node (then it can be removed)")
    drain.add_argument("target", metavar="NODE")
    drain.add_argument("--cancel", action="store_true", help="stop draining the node")
    drain.add_argument("--wait", action="store_true",
                       help="show progress until no replica is left on the node")
    output(drain)

    pki = commands.add_parser("pki", help="make the cluster CA and node certificates")
    pki_actions = pki.add_subparsers(dest="action", required=True)
    init = pki_actions.add_parser("init", help="make a cluster CA and cluster key")
    init.add_argument("--dir", type=Path, default=DEFAULT_PKI_DIR,
                      help=f"where (new or empty; default {DEFAULT_PKI_DIR}); keep it safe")
    issue = pki_actions.add_parser("issue", help="make a node's credentials (a folder to copy "
                                   "to the node and give to `cargohold node --tls-dir`)")
    issue.add_argument("target", metavar="NODE", help="the node's name (`node --name`)")
    issue.add_argument("--dir", type=Path, default=DEFAULT_PKI_DIR,
                       help=f"the CA made by `pki init` (default {DEFAULT_PKI_DIR})")
    issue.add_argument("--out", type=Path, required=True, help="folder to write (new or empty)")
    issue.add_argument("--host", dest="hosts", action="append", default=[],
                       metavar="NAME_OR_ADDRESS",
                       help="a host name or IP address the node's API is reached by over "
                            "HTTPS (repeatable; the node's name is always in)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "node" and args.action is None:
            return _run_node(args)
        if args.command == "pki":
            return _pki(args)
        return _run_client(args)
    except CargoholdError as e:
        print(f"Error: {e.message} [{e.code}]", file=sys.stderr)
        return EXIT_CODES[e.kind]
    except KeyboardInterrupt:
        return 130


def _run_node(args: argparse.Namespace) -> int:
    import asyncio

    from cargohold.daemons.node import NodeDaemon  # the server side loads only when run

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s node %(levelname)s %(name)s: %(message)s")
    fields: dict[str, Any] = {"state_dir": args.state_dir, "data_dirs": args.data_dir,
                              "metadata": args.metadata, "data_host": args.data_host,
                              "lease_ttl": args.lease_ttl,
                              "rebuild_after": args.rebuild_after,
                              "scrub_every": args.scrub_every,
                              "overprovision": args.overprovision,
                              "auto_rebalance": args.auto_rebalance,
                              "engine_metrics": args.engine_metrics,
                              "rebuild_rate": (0 if args.rebuild_rate == "0"
                                               else parse_size(args.rebuild_rate)),
                              "scrub_rate": parse_size(args.scrub_rate)}
    if args.name:
        fields["name"] = args.name
    fields["docker_socket"] = None if args.docker_socket == "none" else Path(args.docker_socket)
    if args.api:
        fields["api"] = [Endpoint(url=url) for url in args.api]
    try:
        if args.csi_endpoint != "none":
            fields["csi_endpoint"] = Endpoint(url=args.csi_endpoint)
        fields["csi_kubelet_dir"] = Path(args.csi_kubelet_dir)
        fields["token"] = read_token(args.token_file)
        for flag in ("tls_dir", "tls_ca", "tls_cert", "tls_key", "cluster_key",
                     "insecure_plaintext", "etcd_password_file"):
            if getattr(args, flag):
                fields[flag] = getattr(args, flag)
        if args.tokens_file:
            fields["tokens"] = read_tokens_file(Path(args.tokens_file))
        config = NodeConfig(**fields)
    except (ValidationError, ValueError) as e:
        raise InvalidArgument(what="node configuration", detail=str(e).splitlines()[-1]) \
            from None
    asyncio.run(NodeDaemon(config).run())
    return 0


def _volume_key(path: str) -> str:
    from cargohold.core.cipher import read_key

    try:
        with open(path, "rb") as f:
            return read_key(f.read(1024)).hex()
    except OSError as e:
        raise InvalidArgument(what="--key-file", detail=f"{path}: {e.strerror or e}") from None


def _pki(args: argparse.Namespace) -> int:
    from cargohold.stores import pki

    if args.action == "init":
        pki.init_authority(args.dir)
        print(f"cluster CA and cluster key made in {args.dir}. Issue each node's credentials "
              f"with `cargohold pki issue NODE --dir {args.dir} --out DIR`")
        return EXIT_OK
    pki.issue(args.dir, args.target, args.out, args.hosts)
    print(f"credentials of node {args.target} written to {args.out}: copy the folder to that "
          f"host (keep it mode 700) and start `cargohold node --name {args.target} --tls-dir "
          "DIR`")
    return EXIT_OK


def _run_client(args: argparse.Namespace) -> int:
    from cargohold.clients.api import ApiClient

    with ApiClient(client_config(args.host, args.token_file, args.ca)) as api:
        as_json = getattr(args, "output", "table") == "json"
        if args.command == "rebalance":
            return _rebalance(api, args.dry_run, args.wait, as_json)
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
            _emit(removed, as_json, f"{args.target} removed; "
                  f"{removed['replicas_to_rebuild']} replica(s) to rebuild elsewhere")
            return 0
        if args.command == "node" and args.action == "drain":
            return _drain(api, args.target, args.cancel, args.wait, as_json)
        if args.command == "node":
            _print_nodes(api.request("GET", "/v1/nodes"), as_json)
            return 0
        if args.command == "snapshot":
            return _snapshot(api, args, as_json)
        if args.command == "backup":
            return _backup(api, args, as_json)
        name: str = getattr(args, "name", "")
        if args.action == "create" and args.source:
            volume = _clone(api, args)
            _emit(volume, as_json, f"{volume['name']} (from {volume['source']}"
                  f"{', filling in the background' if volume.get('origin') else ''})")
        elif args.action == "create":
            if not args.size:
                raise InvalidArgument(what="--size", detail="a new volume needs a size")
            body = {"name": args.name, "size": args.size, "replicas": args.replicas or "2",
                    "fs": args.fs, "encrypt": args.encrypt, "locality": args.locality}
            if args.key_file:
                body["key"] = _volume_key(args.key_file)
            volume = api.request("POST", "/v1/volumes", body)
            _emit(volume, as_json, f"{volume['name']}")
        elif args.action == "resize":
            volume = api.request("POST", f"/v1/volumes/{name}/resize", {"size": args.size})
            _emit(volume, as_json, f"{volume['name']} {format_size(volume['size'])}")
        elif args.action == "ls":
            _print_volumes(api.request("GET", "/v1/volumes"), as_json)
        elif args.action == "inspect":
            _print_inspect(api.request("GET", f"/v1/volumes/{name}"), as_json)
        elif args.action == "attach":
            volume = api.request("POST", f"/v1/volumes/{name}/attach")
            _emit(volume, as_json, volume["attachment"]["mountpoint"])
        elif args.action == "detach":
            force = "?force=true" if args.force else ""
            _emit(api.request("POST", f"/v1/volumes/{name}/detach{force}"), as_json, name)
        elif args.action == "rebuild":
            return _rebuild(api, name, args.wait, as_json)
        elif args.action == "update":
            api.request("PATCH", f"/v1/volumes/{name}", {
                k: v for k, v in (("replicas", args.replicas), ("locality", args.locality))
                if v is not None})
            return _rebuild(api, name, args.wait, as_json)
        elif args.action == "move":
            api.request("POST", f"/v1/volumes/{name}/move", {"to": args.to})
            return _rebuild(api, name, args.wait, as_json)
        elif args.action == "activate":
            volume = api.request("POST", f"/v1/volumes/{name}/activate")
            _emit(volume, as_json, f"{name} is a volume of its own now")
        elif args.action == "revert":
            volume = api.request("POST", f"/v1/volumes/{name}/revert", {"to": args.to})
            _emit(volume, as_json, f"{name} is {args.to} again")
        elif args.action == "scrub":
            report = api.request("POST", f"/v1/volumes/{name}/scrub")
            _emit(report, as_json, _scrub_text(report))
            return scrub_status(report)
        elif args.action == "salvage":
            done = api.request("POST", f"/v1/volumes/{name}/salvage")
            _emit(done, as_json, f"{name}: the copy on data server {done['in_sync']} is in sync "
                  f"again; {done['chunks_newer_elsewhere']} chunk(s) newer on another copy; "
                  f"unreachable: {', '.join(done['unreachable']) or 'none'}")
            return salvage_status(done)
        elif args.action == "rm":
            api.request("DELETE", f"/v1/volumes/{name}")
            _emit({"name": name, "removed": True}, as_json, name)
    return 0


def _clone(api: ApiClient, args: argparse.Namespace) -> Any:
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


def _snapshot(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    from cargohold.core.names import split_snapshot

    if args.action == "ls":
        query = f"?volume={args.volume}" if args.volume else ""
        found = api.request("GET", f"/v1/snapshots{query}")
        if as_json:
            print(json.dumps(found, indent=2))
            return 0
        print(_table([[s["ref"], s["state"],
                       time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"])),
                       format_size(s["size"]),
                       "?" if s["unique"] is None else format_size(s["unique"]),
                       str(len(s["servers"]))] for s in found],
                     ["SNAPSHOT", "STATE", "CREATED", "SIZE", "ALONE", "COPIES"]))
        return 0
    if args.action == "create" and args.group:
        group = api.request("POST", "/v1/snapshot-groups", {
            "name": args.group, "volumes": args.refs, "freeze": not args.no_freeze})
        _emit(group, as_json, "\n".join(f"{s['ref']} (writes held {s['held'] * 1000:.0f} ms)"
                                        for s in group))
        return 0
    if args.action == "rm" and args.group:
        api.request("DELETE", f"/v1/snapshot-groups/{args.group}")
        _emit({"group": args.group, "removed": True}, as_json, args.group)
        return 0
    if args.action == "create" and len(args.refs) != 1:
        raise InvalidArgument(what="snapshot", detail="name one VOLUME@SNAPSHOT (several "
                              "volumes at one instant: --group NAME VOLUME...)")
    volume, name = split_snapshot(args.refs[0] if args.action == "create" else args.ref)
    if args.action == "create":
        taken = api.request("POST", f"/v1/volumes/{volume}/snapshots",
                            {"name": name, "freeze": not args.no_freeze})
        _emit(taken, as_json, f"{taken['ref']} (writes held {taken['held'] * 1000:.0f} ms)")
    elif args.action == "rm":
        api.request("DELETE", f"/v1/volumes/{volume}/snapshots/{name}")
        _emit({"ref": args.ref, "removed": True}, as_json, args.ref)
    return 0


def _backup(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    if args.action == "target":
        if args.target_action == "set":
            body = {"url": args.url, "endpoint": args.endpoint, "region": args.region}
            if args.encryption_key_file:
                body["key"] = args.encryption_key_file.read_bytes().hex()
            shown = api.request("PUT", "/v1/backup-target", body)
        else:
            shown = api.request("GET", "/v1/backup-target")
        _emit(shown, as_json, f"{shown['url']} at {shown['endpoint'] or 'AWS'}"
              f"{' (encrypted)' if shown['encrypted'] else ''}")
    elif args.action == "create":
        job = api.request("POST", "/v1/backups", {"volume": args.volume,
                                                  "snapshot": args.snapshot})
        job = _follow(api, job, f"backing up {args.volume}") if args.wait else job
        _emit(job, as_json, f"backup {job['id']} of {args.volume}: {job['state']}"
              + (f" ({format_size(job['bytes'])}, {format_size(job['new_bytes'])} new)"
                 if job["state"] == "complete" else ""))
    elif args.action == "ls":
        found = api.request("GET", "/v1/backups" + (f"?volume={args.volume}"
                                                      if args.volume else ""))
        if as_json:
            print(json.dumps(found, indent=2))
        else:
            print(_table([[b["id"], b["volume"], b["snapshot"],
                           time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["created"])),
                           b["state"], format_size(b["bytes"]), format_size(b["new_bytes"])]
                          for b in found],
                         ["ID", "VOLUME", "SNAPSHOT", "CREATED", "STATE", "SIZE", "NEW"]))
    elif args.action == "inspect":
        shown = api.request("GET", f"/v1/backups/{args.id}")
        _emit(shown, as_json, "\n".join(f"{k + ':':<12} {v}" for k, v in shown.items()))
    elif args.action == "job":
        job = api.request("GET", f"/v1/backup-jobs/{args.id}")
        _emit(job, as_json, f"{job['kind']} {job['id']} of {job['volume']}: {job['state']} "
              f"{job['progress']:.0%}" + (f": {job['error']}" if job["error"] else ""))
    elif args.action == "verify":
        shown = api.request("POST", f"/v1/backups/{args.id}/verify")
        _emit(shown, as_json, f"backup {args.id}: {shown['blocks']} blocks checked, "
              + ("all good" if shown["ok"] else "bad: " + "; ".join(
                  f"{name}: {why}" for name, why in shown["bad"].items())))
        return 0 if shown["ok"] else EXIT_WARNING
    elif args.action == "rm":
        shown = api.request("DELETE", f"/v1/backups/{args.id}")
        _emit(shown, as_json, f"backup {args.id} removed; "
              + ("its blocks are collected once no backup runs" if shown["deferred"]
                 else f"{shown['deleted']} blocks no backup needs deleted"))
    elif args.action == "schedule" and args.off:
        api.request("DELETE", f"/v1/backup-schedules/{args.volume}")
        _emit({"volume": args.volume, "scheduled": False}, as_json,
              f"{args.volume}: no scheduled backups")
    elif args.action == "schedule":
        if not args.every:
            raise InvalidArgument(what="--every", detail="say how often (or --off)")
        shown = api.request("PUT", f"/v1/backup-schedules/{args.volume}",
                            {"every": args.every, "keep": args.keep})
        _emit(shown, as_json, f"{args.volume}: a backup every {shown['every']:g} s, "
              + (f"the newest {shown['keep']} kept" if shown["keep"] else "all kept"))
    elif args.action == "schedules":
        found = api.request("GET", "/v1/backup-schedules")
        if as_json:
            print(json.dumps(found, indent=2))
        else:
            print(_table([[s["volume"], f"{s['every']:g}s", str(s["keep"] or "all"),
                           time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["last_started"]))
                           if s["last_started"] else "-", s["last_job"] or "-"]
                          for s in found], ["VOLUME", "EVERY", "KEEP", "LAST STARTED", "JOB"]))
    elif args.action == "restore":
        job = api.request("POST", f"/v1/backups/{args.id}/restore",
                          {"to": args.to, "replicas": args.replicas, "standby": args.standby})
        job = _follow(api, job, f"restoring {args.to}") if args.wait else job
        _emit(job, as_json, f"{args.to} from backup {args.id}: {job['state']}")
    failed = args.action in ("create", "restore") and args.wait and job["state"] == "failed"
    return EXIT_WARNING if failed else 0


def _follow(api: ApiClient, job: dict[str, Any], what: str) -> dict[str, Any]:
    """Show a backup or restore job's progress (on stderr) until it ends."""
    while job["state"] == "running":
        done = float(job.get("progress", 0.0))
        print(f"\r{what} [{'#' * int(30 * done):<30}] {done * 100:3.0f}%", end="",
              file=sys.stderr, flush=True)
        time.sleep(0.5)
        job = api.request("GET", f"/v1/backup-jobs/{job['id']}")
    print(f"\r{what} [{'#' * 30}] {job['state']}" + (f": {job['error']}" if job["error"]
                                                     else ""), file=sys.stderr)
    return job


def _rebuild(api: ApiClient, name: str, wait: bool, as_json: bool) -> int:
    """Replicas are resynced and rebuilt on their own (by the controller while the volume is
    detached, by its engine while attached); this shows it."""
    volume = api.request("GET", f"/v1/volumes/{name}")
    while wait and _healing(volume):
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
        _print_inspect(volume, False)
    return 0


def _healing(volume: dict[str, Any]) -> bool:
    """Some replica is not in sync, is being replaced, or sits on a removed data server
    (``node rm --force``: the controller replaces it on its next pass)."""
    return any(r["state"] != "in_sync" or r.get("replaces") or r.get("node") is None
               for r in volume["replicas"])


def _rebalance(api: ApiClient, dry_run: bool, wait: bool, as_json: bool) -> int:
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
        print(_table([[m["volume"], m["source"][:12], m["target"][:12]] for m in moves],
                     ["VOLUME", "FROM", "TO"]))
        print(f"{len(moves)} replicas {verb}")
    else:
        print("balanced: nothing to move")
    return 0


def _drain(api: ApiClient, node: str, cancel: bool, wait: bool, as_json: bool) -> int:
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
    _emit(view, as_json, f"{node}: {'draining' if view['draining'] else 'not draining'}, "
                         f"{view['replicas']} replicas on it")
    return 0


def scrub_status(report: dict[str, Any]) -> int:
    """A scrub that lost chunks or could not read every copy ends with a warning."""
    return EXIT_WARNING if report["lost"] or report["skipped"] else EXIT_OK


def salvage_status(done: dict[str, Any]) -> int:
    """A salvage that left newer chunks or unreachable copies behind ends with a warning."""
    return EXIT_WARNING if done["chunks_newer_elsewhere"] or done["unreachable"] else EXIT_OK


def _scrub_text(report: dict[str, Any]) -> str:
    lines = [f"{report['volume']}: {report['chunks']} chunks read from every in-sync copy "
             f"({format_size(report['bytes_read'])}) in {report['seconds']:.1f} s",
             f"repaired: {len(report['repaired'])} copies",
             f"lost: {len(report['lost'])} chunks without a clean copy"]
    lines += [f"  chunk {r['chunk']} on data server {r['server']}" for r in report["repaired"]]
    if report["lost"]:
        lines.append(f"  lost chunks: {', '.join(str(c) for c in report['lost'])}")
    if report["skipped"]:
        lines.append(f"not checked (unreachable): {', '.join(report['skipped'])}")
    return "\n".join(lines)


def _emit(value: Any, as_json: bool, text: str) -> None:
    print(json.dumps(value, indent=2) if as_json else text)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def _print_volumes(volumes: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(volumes, indent=2))
        return
    rows = [[v["name"], format_size(v["size"]), f"{v['in_sync']}/{v['replica_count']}",
             v["fs"], v["state"], (v["attachment"] or {}).get("node", "")] for v in volumes]
    print(_table(rows, ["NAME", "SIZE", "REPLICAS", "FS", "STATE", "NODE"]))


def _print_inspect(volume: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(volume, indent=2))
        return
    att = volume["attachment"] or {}
    used = volume.get("used")
    lines = [f"Name:        {volume['name']}", f"ID:          {volume['id']}",
             f"Size:        {format_size(volume['size'])} (thin; "
             f"{format_size(used) if used is not None else '?'} written)",
             f"Filesystem:  {volume['fs']}", f"State:       {volume['state']}",
             f"Attached:    {att.get('node', '-')} {att.get('mountpoint', '')}".rstrip(),
             f"Replicas:    {volume['in_sync']} of {volume['replica_count']} in sync",
             f"Locality:    {volume.get('locality', 'best-effort')}"]
    if volume.get("origin"):
        lines.append(f"Clone of:    {volume['source']} (filling, {volume['filled']:.0%} "
                     "copied: depends on it until filled)")
    elif volume.get("source"):
        lines.append(f"Clone of:    {volume['source']}")
    if volume.get("standby"):
        lines.append(f"Standby:     follows the backups of {volume['standby']}, holds "
                     f"{volume['restoring']} (activate to attach)")
    elif volume.get("restoring"):
        lines.append(f"Restoring:   from backup {volume['restoring']} (not attachable yet)")
    last = volume.get("last_backup")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["finished"] or
                                                                   last["started"]))
        lines.append(f"Backup:      {last['id']} {last['state']} {when}"
                     + (f" ({format_size(last['bytes'])}, {format_size(last['new_bytes'])} "
                        "new)" if last["state"] == "complete" else "")
                     + (f": {last['error']}" if last["error"] else ""))
    if volume.get("last_error"):
        lines.append(f"Last error:  {volume['last_error']}")
    print("\n".join(lines))
    rows = [[r["server"][:12], r.get("node") or "?", r.get("path") or "?", _replica_state(r),
             format_size(r["used"]) if r.get("used") is not None else "?", r.get("reason", "")]
            for r in volume["replicas"]]
    print(_table(rows, ["SERVER", "NODE", "PATH", "STATE", "USED", "REASON"]))


def _replica_state(replica: dict[str, Any]) -> str:
    if replica["state"] == "resyncing":
        return f"resyncing {replica.get('progress', 0) * 100:.0f}%"
    return str(replica["state"])


def _print_nodes(nodes: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(nodes, indent=2))
        return
    rows = []
    for node in nodes:
        seen = f"{max(0, time.time() - node['last_seen']):.0f}s ago"
        role = ",".join(r for r in ("controller", "draining") if node.get(r))
        rows.append([node["name"], node["health"], seen, role, "", format_size(node["capacity"]),
                     format_size(node["free"]), format_size(node["used"]),
                     format_size(node["provisioned"])])
        for server in node["data_servers"]:
            rows.append(["", server["health"], "", "", f"{server['id'][:12]} {server['path']}",
                         format_size(server["capacity"]), format_size(server["free"]),
                         format_size(server["used"]), format_size(server["provisioned"])])
    print(_table(rows, ["NODE", "HEALTH", "LAST SEEN", "ROLE", "DATA SERVER", "CAPACITY",
                        "FREE", "USED", "PROVISIONED"]))


if __name__ == "__main__":
    sys.exit(main())
