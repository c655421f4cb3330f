"""The commands that run on this host without a node's API: the node itself, and the
cluster CA (``pki``)."""

from __future__ import annotations

import argparse
import logging
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cargohold.cli.exits import EXIT_OK
from cargohold.cli.parser import NODE_SETTINGS, NodeSetting
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
    config = node_config(args)
    asyncio.run(NodeDaemon(config).run())
    return 0


def node_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The node's settings by ``dest``: the flags given, over the keys of ``--config``."""
    settings = read_settings_file(args.config) if getattr(args, "config", None) else {}
    for setting in NODE_SETTINGS:
        value = getattr(args, setting.dest, None)
        if value is not None:
            settings[setting.dest] = value
    return settings


def read_settings_file(path: Path) -> dict[str, Any]:
    """The settings of a node's TOML file; ``InvalidArgument`` naming the first key that is
    unknown or whose value has the wrong type."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise InvalidArgument(what="--config", detail=f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(what="--config", detail=f"{path}: not TOML: {e}") from None
    known = {s.name: s for s in NODE_SETTINGS}
    settings: dict[str, Any] = {}
    for key, value in table.items():
        setting = known.get(key)
        if setting is None:
            raise InvalidArgument(what="--config", detail=f"{path}: unknown key {key!r}; the "
                                  f"keys are the flags of `cargohold node`: "
                                  f"{', '.join(sorted(known))}")
        settings[setting.dest] = _setting_value(path, setting, value)
    return settings


def _setting_value(path: Path, setting: NodeSetting, value: object) -> Any:
    many = setting.kind in ("texts", "paths")
    values = value if isinstance(value, list) else [value]
    if many != isinstance(value, list) or not all(_is_kind(setting.kind, v) for v in values):
        wanted = {"switch": "true or false", "number": "a number", "texts": "a list of "
                  "strings", "paths": "a list of strings"}.get(setting.kind, "a string")
        raise InvalidArgument(what="--config", detail=f"{path}: {setting.name} = {value!r}: "
                              f"want {wanted}")
    if setting.kind == "number":
        return float(value)  # type: ignore[arg-type]
    if setting.kind == "path":
        return Path(value)  # type: ignore[arg-type]
    if setting.kind == "paths":
        return [Path(str(v)) for v in values]
    return value


def _is_kind(kind: str, value: object) -> bool:
    if kind == "switch":
        return isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def node_config(args: argparse.Namespace) -> NodeConfig:
    """The node's configuration from its flags and ``--config`` file; ``InvalidArgument``
    naming what is wrong."""
    given = node_settings(args)
    fields: dict[str, Any] = {}
    for name in ("state_dir", "metadata", "data_host", "lease_ttl", "rebuild_after",
                 "scrub_every", "overprovision", "auto_rebalance", "name", "tls_dir", "tls_ca",
                 "tls_cert", "tls_key", "cluster_key", "insecure_plaintext",
                 "etcd_password_file"):
        if given.get(name) not in (None, ""):  # "": the default, as before
            fields[name] = given[name]
    fields["data_dirs"] = given.get("data_dir", [])
    fields["engine_metrics"] = not given.get("no_engine_metrics", False)
    try:
        if "rebuild_rate" in given:
            rate = given["rebuild_rate"]
            fields["rebuild_rate"] = 0 if rate == "0" else parse_size(rate)
        if "scrub_rate" in given:
            fields["scrub_rate"] = parse_size(given["scrub_rate"])
        if "docker_socket" in given:
            socket = given["docker_socket"]
            fields["docker_socket"] = None if socket == "none" else Path(socket)
        if given.get("api"):
            fields["api"] = [Endpoint(url=url) for url in given["api"]]
        if given.get("csi_endpoint", "none") != "none":
            fields["csi_endpoint"] = Endpoint(url=given["csi_endpoint"])
        if "csi_kubelet_dir" in given:
            fields["csi_kubelet_dir"] = given["csi_kubelet_dir"]
        token_file = given.get("token_file")
        fields["token"] = read_token(str(token_file) if token_file is not None else None)
        if given.get("tokens_file"):
            fields["tokens"] = read_tokens_file(Path(given["tokens_file"]))
        return NodeConfig(**fields)
    except ValidationError as e:  # a setting's name and what is wrong with it
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]).replace("_", "-")
        raise InvalidArgument(what="node configuration",
                              detail=f"{where}: {first['msg']}" if where else first["msg"]) \
            from None
    except ValueError as e:
        raise InvalidArgument(what="node configuration", detail=str(e)) from None


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
