"""The commands that run on this host without a node's API: the node itself, and the
cluster CA (``pki``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cargohold.cli.exits import EXIT_OK
from cargohold.config import (
    Endpoint,
    NodeConfig,
    read_token,
    read_tokens_file,
)
from cargohold.core.sizes import parse_size
from cargohold.errors import InvalidArgument


def run_node(args: argparse.Namespace) -> int:
    import asyncio

    from cargohold.daemons.node import NodeDaemon  # the server side loads only when run

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s node %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request to a remote
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


def pki_command(args: argparse.Namespace) -> int:
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
