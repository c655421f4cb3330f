"""The command line's arguments: every command, its options and their help."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, NamedTuple

from cargohold import __version__
from cargohold.cli import exits
from cargohold.config import (
    DEFAULT_API,
    DEFAULT_DOCKER_SOCKET,
    DEFAULT_KUBELET_DIR,
    DEFAULT_STATE_DIR,
    LEASE_TTL,
)

DEFAULT_PKI_DIR = Path("/var/lib/cargohold/pki")
LOCALITY_HELP = ("best-effort (default: a replica is moved to the node it is attached on), "
                 "strict (also: no attach on a node that cannot hold one) or off")


class NodeSetting(NamedTuple):
    """A setting of ``cargohold node``: a flag, and the same key in its --config file."""

    name: str  # the flag without its dashes, and the file's key
    kind: str  # text, path, number, switch (a flag without value), texts/paths (repeatable)
    help: str

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kinds: dict[str, dict[str, Any]] = {
            "text": {}, "path": {"type": Path}, "number": {"type": float},
            "switch": {"action": "store_true"}, "texts": {"action": "append"},
            "paths": {"action": "append", "type": Path}}
        parser.add_argument(f"--{self.name}", help=self.help, **kinds[self.kind])


#: Every setting of the node (defaults: ``config.NodeConfig``'s).
NODE_SETTINGS = (
    NodeSetting("state-dir", "path", "where the node keeps its state (default "
                f"{DEFAULT_STATE_DIR})"),
    NodeSetting("data-dir", "paths", "a directory (disk) to serve as a data server; "
                "repeatable"),
    NodeSetting("metadata", "text", "metadata store URL (default sqlite:///STATE_DIR/meta.db)"),
    NodeSetting("api", "texts", f"unix:///PATH or tcp://HOST:PORT; repeatable (default "
                f"{DEFAULT_API})"),
    NodeSetting("name", "text", "node name (default: host name)"),
    NodeSetting("data-host", "text", "address the data servers listen on (default 127.0.0.1 "
                "alone, with etcd on other hosts this host's address facing them)"),
    NodeSetting("docker-socket", "text", "where to serve the Docker volume plugin ('none' to "
                f"disable; default {DEFAULT_DOCKER_SOCKET})"),
    NodeSetting("rebuild-after", "number", "seconds a data server may be down before its "
                "replicas are rebuilt elsewhere (default 600)"),
    NodeSetting("overprovision", "number", "thin volumes may provision this many times a data "
                "server's capacity (default 2; 0: no limit)"),
    NodeSetting("auto-rebalance", "switch", "move replicas onto new data servers without being "
                "asked"),
    NodeSetting("no-engine-metrics", "switch", "engines do not count requests and their "
                "latencies (/metrics then has no per-volume I/O)"),
    NodeSetting("rebuild-rate", "text", "bytes per second resync and rebuild copies may use, "
                "e.g. 200M (default 0: no limit)"),
    NodeSetting("scrub-every", "number", "seconds between background scrubs of a detached "
                "volume (default a week; 0 turns them off)"),
    NodeSetting("scrub-rate", "text", "read rate of background scrubs per second, e.g. 50M "
                "(default)"),
    NodeSetting("lease-ttl", "number", "seconds without renewal after which this node counts "
                f"as down and its volumes may be taken over (default {LEASE_TTL:g}; 3 or more "
                "with etcd)"),
    NodeSetting("token-file", "path", "the admin bearer token of a TCP API (first line; the "
                "same as `cargohold --token-file FILE node`)"),
    NodeSetting("tokens-file", "path", "named bearer tokens of the TCP API, a line each: NAME "
                "ROLE TOKEN (ROLE admin or read-only); mode 600"),
    NodeSetting("csi-endpoint", "text", "serve the Kubernetes CSI driver on unix:///PATH "
                "(default: none)"),
    NodeSetting("csi-kubelet-dir", "path", "the only directory under which the CSI driver "
                f"stages and publishes volumes (default {DEFAULT_KUBELET_DIR})"),
    NodeSetting("tls-dir", "path", "this node's TLS files and cluster key, as `pki issue` "
                "writes them (ca.crt, node.crt, node.key, cluster.key); default STATE_DIR/tls, "
                "made with a new cluster CA (STATE_DIR/pki) on first start"),
    NodeSetting("tls-ca", "path", "the cluster CA certificate (your own CA)"),
    NodeSetting("tls-cert", "path", "this node's certificate; its common name must be the "
                "node's name"),
    NodeSetting("tls-key", "path", "this node's private key (mode 600)"),
    NodeSetting("cluster-key", "path", "the secret that signs capabilities, the same file on "
                "every node (hex, 32 bytes or more; mode 600)"),
    NodeSetting("etcd-password-file", "path", "the password (first line; mode 600) of the etcd "
                "user named in --metadata etcds://USER@HOST:PORT,..."),
    NodeSetting("insecure-plaintext", "switch", "no TLS between hosts and no capabilities on "
                "the data path: anyone who reaches a data server's port can use it. Never in "
                "production"),
)


def build() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cargohold", description="The cargohold command line.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=exits.__doc__)
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
                         ("activate", "make a standby restore a volume of its own"),
                         ("promote", "make a standby of another cluster's volume writable "
                                     "(its source is fenced out)")):
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

    replicate = volume.add_parser("replicate", help="copy a volume to another cluster "
                                  "every so often (asynchronous; shows the lag)")
    replicate.add_argument("name")
    replicate.add_argument("--to", metavar="REMOTE", help="the cluster ('remote add')")
    replicate.add_argument("--every", default="60s",
                           help="10s, 5m, 1h or seconds between copies (default 60s)")
    replicate.add_argument("--now", action="store_true", help="start a copy now")
    replicate.add_argument("--off", action="store_true", help="stop copying (the remote "
                           "keeps its standby)")
    replicate.add_argument("--wait", action="store_true",
                           help="show progress until the next copy is complete")
    output(replicate)

    migrate = volume.add_parser("migrate", help="move a volume to another cluster while in "
                                "use (copies, then a short hold of its writes)")
    migrate.add_argument("name")
    migrate.add_argument("--to", required=True, metavar="REMOTE")
    migrate.add_argument("--wait", action="store_true",
                         help="show progress until it is done or failed")
    output(migrate)

    container = commands.add_parser(
        "container", help="Docker containers with cargohold volumes").add_subparsers(
        dest="action", required=True)
    moving = container.add_parser("migrate", help="move a running container and its volumes "
                                  "to a host of another cluster (paused during the handover, "
                                  "then started there)")
    moving.add_argument("container")
    moving.add_argument("--to", required=True, metavar="REMOTE", help="the cluster")
    moving.add_argument("--target-docker", required=True, metavar="URL",
                        help="the dockerd of the host there: unix:///PATH or tcp://HOST:PORT")
    moving.add_argument("--docker", default=os.environ.get("DOCKER_HOST",
                                                           "unix:///var/run/docker.sock"),
                        metavar="URL", help="the dockerd running the container (default "
                        "$DOCKER_HOST, else the local one)")
    moving.add_argument("--driver", default="cargohold",
                        help="the volume driver's name in Docker (default cargohold)")
    output(moving)

    remote = commands.add_parser(
        "remote", help="other clusters to copy volumes to").add_subparsers(
        dest="action", required=True)
    adding = remote.add_parser("add", help="add a cluster (checked: its API answers)")
    adding.add_argument("name")
    adding.add_argument("--endpoint", required=True, metavar="URL",
                        help="https://HOST:PORT of one of its nodes' API")
    adding.add_argument("--token-file", dest="remote_token", required=True, metavar="FILE",
                        help="a file holding an admin token of its API")
    adding.add_argument("--ca", dest="remote_ca", metavar="FILE",
                        help="its API's CA certificate (default: the system's)")
    output(adding)
    output(remote.add_parser("ls", help="the clusters known here"))
    dropping = remote.add_parser("rm", help="forget a cluster")
    dropping.add_argument("name")
    output(dropping)

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

    node = commands.add_parser(
        "node", help="run this host's node, or list nodes", argument_default=argparse.SUPPRESS,
        description="Run this host's node. Its settings come from the flags below, and from "
                    "--config FILE (TOML) for those not given as flags: each flag is a key "
                    "of the file, e.g. data-dir = [\"/srv/disk1\"], rebuild-after = 600, "
                    "auto-rebalance = true.")
    node.add_argument("--config", metavar="FILE", type=Path,
                      help="a TOML file of node settings (the package's: "
                           "/etc/cargohold/node.toml); unknown keys are refused")
    for each in NODE_SETTINGS:
        each.add_to(node)
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
