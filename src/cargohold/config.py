"""Typed configuration, read in one place; the rest of the code receives these objects.

One model per process: :class:`NodeConfig` (``cargohold node``, built by the CLI),
:class:`EngineConfig` (one engine per attached volume, started by the node's agent) and
:class:`DataServerConfig` (one data server per data directory, started by the node). The
engine and data server models are also their command lines: the starter calls ``argv()``, the
process reads ``from_argv()``, so both sides agree by construction.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cargohold.errors import InvalidArgument

DEFAULT_STATE_DIR = Path("/var/lib/cargohold")
DEFAULT_CA = DEFAULT_STATE_DIR / "tls" / "ca.crt"  # the cluster CA of this host's node
DEFAULT_API = "unix:///run/cargohold/api.sock"
DEFAULT_DOCKER_SOCKET = Path("/run/docker/plugins/cargohold.sock")
DEFAULT_KUBELET_DIR = Path("/var/lib/kubelet")
HOST_ENV = "CARGOHOLD_HOST"
TOKEN_ENV = "CARGOHOLD_TOKEN"
CA_ENV = "CARGOHOLD_CA"
MIN_TOKEN = 16  # characters of a bearer token a node accepts


class Endpoint(BaseModel):
    """An API endpoint: ``unix:///path`` or ``tcp://host:port`` (HTTPS; ``http://host:port``
    for a node that serves it in plaintext, ``--insecure-plaintext``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str

    @field_validator("url")
    @classmethod
    def _check(cls, url: str) -> str:
        parsed = urlparse(url)
        if parsed.scheme == "unix" and parsed.path:
            return url
        if parsed.scheme in ("tcp", "http", "https") and parsed.hostname and parsed.port:
            return url
        raise ValueError(f"{url!r} is not unix:///PATH or tcp://HOST:PORT")

    @property
    def is_unix(self) -> bool:
        return self.url.startswith("unix://")

    @property
    def is_plaintext(self) -> bool:
        return self.url.startswith("http://")

    @property
    def path(self) -> str:
        return urlparse(self.url).path

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlparse(self.url).port or 0


class ApiToken(BaseModel):
    """A bearer token of the TCP API: its name (for the audit log), role and secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    role: Literal["admin", "read-only"]
    token: str = Field(min_length=MIN_TOKEN, repr=False)


def check_private(path: Path, what: str) -> None:
    """Refuse a secret's file that others than its owner may read (as ssh does a key)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise InvalidArgument(what=what, detail=f"{path}: {e.strerror or e}") from None
    if mode & 0o077:
        raise InvalidArgument(what=what, detail=f"{path} is readable by others "
                              f"(mode {mode & 0o777:o}): chmod 600 it")


def read_tokens_file(path: Path) -> list[ApiToken]:
    """``NAME ROLE TOKEN`` per line (``#`` starts a comment; ROLE is admin or read-only).
    The file must be readable by its owner only, as an ssh key must."""
    check_private(path, "--tokens-file")
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InvalidArgument(what="--tokens-file", detail=f"{path}: {e.strerror or e}") from None
    tokens: list[ApiToken] = []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            if len(words) != 3:
                raise ValueError("want NAME ROLE TOKEN")
            tokens.append(ApiToken(name=words[0], role=words[1], token=words[2]))  # type: ignore[arg-type]
        except (ValueError, ValidationError) as e:
            detail = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            raise InvalidArgument(what="--tokens-file",
                                  detail=f"{path} line {number}: {detail}") from None
    if len({t.name for t in tokens}) != len(tokens):
        raise InvalidArgument(what="--tokens-file", detail=f"{path}: a name is used twice")
    return tokens


#: A node's lease, in seconds: a host killed under a Swarm service (heartbeat 1 s) had it
#: running again elsewhere after 6.5-10.6 s (median 7.7 s) with 5 s; 10 s gave 11-16 s.
LEASE_TTL = 5.0
#: Seconds one etcd request may wait on one member before the next is tried.
ETCD_REQUEST_TIMEOUT = 1.0


def etcd_hosts(url: str) -> list[str]:
    """The hosts of an ``etcd[s]://[USER@]`` metadata URL (none for another store)."""
    if not url.startswith(("etcd://", "etcds://")):
        return []
    members = url.split("://", 1)[1].rpartition("@")[2]
    return [e.rpartition(":")[0].strip("[]") for e in members.split(",")]


def read_secret(path: Path | None, what: str) -> str:
    """The first line of a file only root may read (a password), or "" without a file."""
    if path is None:
        return ""
    check_private(path, what)
    try:
        text = path.read_text()
        return text.splitlines()[0].strip() if text.strip() else ""
    except OSError as e:
        raise InvalidArgument(what=what, detail=f"{path}: {e.strerror or e}") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def address_towards(host: str) -> str:
    """This host's address on the route to ``host`` (no packet is sent)."""
    try:
        family = socket.getaddrinfo(host, 2379, proto=socket.IPPROTO_UDP)[0]
        with socket.socket(family[0], socket.SOCK_DGRAM) as probe:
            probe.connect(family[4])
            return str(probe.getsockname()[0])
    except OSError as e:
        raise InvalidArgument(what="--data-host",
                              detail=f"no route to etcd member {host} to find this host's "
                                     f"address ({e.strerror or e}): give --data-host") from None


class TlsFiles(BaseModel):
    """A host's TLS files: the cluster CA, its certificate and key (``cargohold pki``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca: Path
    cert: Path
    key: Path

    def argv(self) -> list[str]:
        return ["--tls-ca", str(self.ca), "--tls-cert", str(self.cert),
                "--tls-key", str(self.key)]


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", type=Path, help="the cluster CA certificate")
    parser.add_argument("--tls-cert", type=Path, help="this host's certificate")
    parser.add_argument("--tls-key", type=Path, help="this host's key")
    parser.add_argument("--insecure-plaintext", action="store_true",
                        help="TCP without TLS: anyone who reaches the port is let in")


def _tls_files(prog: str, args: argparse.Namespace) -> TlsFiles | None:
    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if any(given) and not all(given):
        raise InvalidArgument(what=f"{prog} arguments",
                              detail="--tls-ca, --tls-cert and --tls-key go together")
    if not any(given) and not args.insecure_plaintext:
        raise InvalidArgument(what=f"{prog} arguments",
                              detail="TLS files (--tls-ca, --tls-cert, --tls-key) or "
                                     "--insecure-plaintext are needed")
    return None if args.insecure_plaintext else TlsFiles(ca=args.tls_ca, cert=args.tls_cert,
                                                         key=args.tls_key)


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default_factory=socket.gethostname)
    state_dir: Path = DEFAULT_STATE_DIR
    data_dirs: list[Path] = []
    metadata: str = ""
    api: list[Endpoint] = [Endpoint(url=DEFAULT_API)]
    token: str = ""  # an admin token named "default" (--token-file, CARGOHOLD_TOKEN)
    tokens: list[ApiToken] = []  # named tokens with roles (--tokens-file)
    docker_socket: Path | None = DEFAULT_DOCKER_SOCKET  # None: no Docker volume plugin
    csi_endpoint: Endpoint | None = None  # unix:///PATH of the CSI driver; None: no CSI
    csi_kubelet_dir: Path = DEFAULT_KUBELET_DIR  # CSI stages and publishes only under it
    # address the data servers listen on and advertise; "": 127.0.0.1 alone, or with etcd
    # on other hosts this host's address towards them
    data_host: str = ""
    lease_ttl: float = Field(default=LEASE_TTL, ge=2.0)  # seconds; keepalive every second
    server_check_interval: float = 1.0
    overprovision: float = Field(default=2.0, ge=0.0)  # provisioned/capacity; 0: no limit
    rebuild_after: float = Field(default=600.0, ge=0.0)  # seconds down before a rebuild
    rebuild_rate: float = Field(default=0.0, ge=0.0)  # bytes/s of resync copies; 0: any
    auto_rebalance: bool = False  # move replicas onto new data servers by themselves
    engine_metrics: bool = True  # engines count requests and latencies for /metrics
    scrub_every: float = Field(default=7 * 86400.0, ge=0.0)  # 0: no background scrub
    scrub_rate: float = Field(default=50 << 20, ge=0.0)  # bytes/s of a background scrub; 0: any
    # TLS between hosts and the cluster key (``stores/pki.py``): the files of ``tls_dir``
    # (default STATE_DIR/tls, made with a new cluster CA on first start), each replaceable
    tls_dir: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cluster_key: Path | None = None
    insecure_plaintext: bool = False  # TCP between hosts without TLS (loudly logged)
    etcd_password_file: Path | None = None  # the password of the etcds://USER@ in metadata

    def model_post_init(self, _context: object) -> None:
        if not self.metadata:
            self.metadata = f"sqlite://{(self.state_dir / 'meta.db').absolute()}"
        if self.token and len(self.token) < MIN_TOKEN:
            raise InvalidArgument(what="API token", detail=f"a bearer token needs {MIN_TOKEN} "
                                  f"characters or more (--token-file or {TOKEN_ENV})")
        if any(not e.is_unix for e in self.api) and not self.api_tokens():
            raise InvalidArgument(what="API endpoint",
                                  detail=f"a TCP API needs a bearer token of {MIN_TOKEN} "
                                         f"characters or more (--token-file, {TOKEN_ENV} or "
                                         "--tokens-file)")
        members = etcd_hosts(self.metadata)
        remote = [h for h in members if not is_loopback(h)]
        if self.metadata.startswith("etcd://") and remote and not self.insecure_plaintext:
            raise InvalidArgument(what="metadata URL",
                                  detail=f"{self.metadata} is etcd in plaintext across "
                                         "hosts: use etcds:// (etcd with TLS of the "
                                         "cluster CA) or say --insecure-plaintext")
        if not self.data_host:
            self.data_host = address_towards(remote[0]) if remote else "127.0.0.1"
        elif remote and is_loopback(self.data_host):
            raise InvalidArgument(what="--data-host",
                                  detail=f"{self.data_host} cannot be reached from the other "
                                         f"hosts of etcd {', '.join(remote)}: give this "
                                         "host's address (or leave --data-host out to use "
                                         "the one facing them)")
        least = self.server_check_interval + 2 * ETCD_REQUEST_TIMEOUT
        if members and self.lease_ttl < least:
            raise InvalidArgument(what="--lease-ttl",
                                  detail=f"{self.lease_ttl:g} s is too short with etcd: a "
                                         f"renewal every {self.server_check_interval:g} s "
                                         f"whose request may wait {ETCD_REQUEST_TIMEOUT:g} s "
                                         f"on a member and as long on the next needs "
                                         f"{least:g} s or more")
        if self.csi_endpoint is not None and not self.csi_endpoint.is_unix:
            raise InvalidArgument(what="CSI endpoint",
                                  detail="the CSI driver serves a unix socket: unix:///PATH")
        if not self.csi_kubelet_dir.is_absolute() or self.csi_kubelet_dir == Path("/"):
            raise InvalidArgument(what="--csi-kubelet-dir",
                                  detail=f"{self.csi_kubelet_dir} is not an absolute path "
                                         "below /")


    @property
    def own_tls(self) -> bool:
        """Whether the node makes its credentials itself (no TLS flag given)."""
        return not any((self.tls_dir, self.tls_ca, self.tls_cert, self.tls_key,
                        self.cluster_key))

    def tls_files(self) -> tuple[TlsFiles, Path]:
        """The node's TLS files and its cluster key file."""
        base = self.tls_dir or self.state_dir / "tls"
        files = TlsFiles(ca=self.tls_ca or base / "ca.crt", cert=self.tls_cert or base / "node.crt",
                         key=self.tls_key or base / "node.key")
        return files, self.cluster_key or base / "cluster.key"

    def api_tokens(self) -> list[ApiToken]:
        """Every token the TCP API takes: the named ones and the default admin one."""
        default = ([ApiToken(name="default", role="admin", token=self.token)]
                   if self.token else [])
        return [*self.tokens, *default]


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: Endpoint = Endpoint(url=DEFAULT_API)
    token: str = ""
    ca: Path | None = None  # the CA that signed the node's HTTPS certificate (TCP)


def client_config(host: str | None, token_file: str | None,
                  ca: str | None = None) -> ClientConfig:
    """What the CLI uses: flags first, then ``CARGOHOLD_HOST``/``CARGOHOLD_TOKEN``/
    ``CARGOHOLD_CA``; over TCP the default CA is this host's node's (``DEFAULT_CA``)."""
    url = host or os.environ.get(HOST_ENV) or DEFAULT_API
    try:
        endpoint = Endpoint(url=url)
    except ValueError as e:
        raise InvalidArgument(what="--host", detail=str(e)) from None
    authority = ca or os.environ.get(CA_ENV)
    if authority is None and DEFAULT_CA.exists():
        authority = str(DEFAULT_CA)
    return ClientConfig(host=endpoint, token=read_token(token_file),
                        ca=Path(authority) if authority else None)


def read_token(token_file: str | None) -> str:
    """The bearer token: the first line of ``token_file``, else ``CARGOHOLD_TOKEN``."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV, "")
    try:
        with open(token_file) as f:
            return f.readline().strip()
    except OSError as e:
        raise InvalidArgument(what="--token-file", detail=f"{token_file}: "
                              f"{e.strerror or e}") from None


# --- the processes a node starts ---------------------------------------------------------

ENGINE_MODULE = "cargohold.daemons.engine"
DATASERVER_MODULE = "cargohold.daemons.dataserver"
#: Where earlier releases ran them from: a node upgraded in place still recognises (adopts or
#: stops) the engines and data servers that the previous release started.
ENGINE_MODULES = (ENGINE_MODULE, "cargohold.services.engine")
DATASERVER_MODULES = (DATASERVER_MODULE, "cargohold.services.dataserver")
#: The agent sends this signal to an engine after its volume grew: the engine reads the new
#: size from the metadata store, checks its replicas and makes the FUSE file grow.
RESIZE_SIGNAL = signal.SIGUSR1


class _Parser(argparse.ArgumentParser):
    """argparse that raises InvalidArgument instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InvalidArgument(what=f"{self.prog} arguments", detail=message)


Model = TypeVar("Model", bound=BaseModel)


def _build(cls: type[Model], prog: str, **fields: Any) -> Model:
    try:
        return cls(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise InvalidArgument(what=f"{prog} arguments", detail=f"--{first['loc'][0]}: "
                              f"{first['msg']}".replace("_", "-")) from None


class EngineConfig(BaseModel):
    """What an engine is told: which attachment it serves, where, and how fast it heals."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metadata: str
    volume: str
    epoch: int = Field(ge=0)
    node: str
    mountpoint: Path
    ready_file: Path
    heal_rate: float = Field(default=0.0, ge=0.0)  # bytes/s catching up may use; 0: any
    scrub_rate: float = Field(default=0.0, ge=0.0)  # bytes/s a scrub may read; 0: any
    tls: TlsFiles | None = None  # None: plaintext TCP to remote data servers
    capability_file: Path | None = None  # the attachment's capability (JSON, 0600)
    lease_ttl: float = Field(default=0.0, ge=0.0)  # watch the node's lease (0: do not)
    etcd_password_file: Path | None = None  # as the node's
    stats_file: Path | None = None  # where to keep the I/O counts (None: do not count)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", ENGINE_MODULE, "--metadata", self.metadata,
                "--volume", self.volume, "--epoch", str(self.epoch), "--node", self.node,
                "--mountpoint", str(self.mountpoint), "--ready-file", str(self.ready_file),
                "--heal-rate", str(self.heal_rate), "--scrub-rate", str(self.scrub_rate)]
        argv += self.tls.argv() if self.tls is not None else ["--insecure-plaintext"]
        if self.capability_file is not None:
            argv += ["--capability-file", str(self.capability_file)]
        if self.lease_ttl:
            argv += ["--lease-ttl", str(self.lease_ttl)]
        if self.etcd_password_file is not None:
            argv += ["--etcd-password-file", str(self.etcd_password_file)]
        if self.stats_file is not None:
            argv += ["--stats-file", str(self.stats_file)]
        return argv

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> EngineConfig:
        parser = _Parser(prog="cargohold-engine")
        parser.add_argument("--metadata", required=True)
        parser.add_argument("--volume", required=True)
        parser.add_argument("--epoch", type=int, required=True)
        parser.add_argument("--node", required=True)
        parser.add_argument("--mountpoint", type=Path, required=True)
        parser.add_argument("--ready-file", type=Path, required=True)
        parser.add_argument("--heal-rate", type=float, default=0.0,
                            help="bytes per second catching up a replica may use (0: no limit)")
        parser.add_argument("--scrub-rate", type=float, default=0.0,
                            help="bytes per second a scrub may read (0: no limit)")
        parser.add_argument("--capability-file", type=Path,
                            help="the attachment's capability, written by the node")
        parser.add_argument("--lease-ttl", type=float, default=0.0,
                            help="fail all I/O once the node's lease is lost for this long "
                                 "(0: never)")
        parser.add_argument("--etcd-password-file", type=Path,
                            help="the password of the etcd user in --metadata")
        parser.add_argument("--stats-file", type=Path,
                            help="count requests and their latencies, written here every "
                                 "2 s (JSON) for the node's /metrics")
        _add_tls_arguments(parser)
        args = parser.parse_args(argv)
        tls = _tls_files(parser.prog, args)
        fields = {k: v for k, v in vars(args).items()
                  if not k.startswith(("tls_", "insecure_"))}
        return _build(cls, parser.prog, tls=tls, **fields)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a host and a port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(what="listen address", detail=f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


#: A data server's defaults for what one client can make it hold (``adapters/dataserver/``).
MAX_CONNECTIONS = 256  # connections served at once; more are closed
FRAME_TIMEOUT = 30.0  # seconds a connection may sit with half a frame received


class DataServerConfig(BaseModel):
    """What a data server is told: its directory, where to listen, where to say it is ready.

    Port 0 reuses the port of the previous run (kept in the directory) when it is free, so
    that the server's address survives restarts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    ready_file: Path | None = None
    log_level: str = "INFO"
    max_connections: int = Field(default=MAX_CONNECTIONS, ge=1)
    frame_timeout: float = Field(default=FRAME_TIMEOUT, gt=0.0)
    tls: TlsFiles | None = None  # None: plaintext TCP (--insecure-plaintext)
    cluster_key: Path | None = None  # None: any epoch from anyone connected
    node: str = ""  # the node it runs on: who may use the unix socket's capabilities
    reserve: int = -1  # bytes kept free for chunks in use (-1: 1% of the disk; 0: none)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", DATASERVER_MODULE, "--dir", str(self.root),
                "--listen", f"{self.host}:{self.port}", "--log-level", self.log_level,
                "--max-connections", str(self.max_connections),
                "--frame-timeout", str(self.frame_timeout)]
        if self.ready_file is not None:
            argv += ["--ready-file", str(self.ready_file)]
        argv += self.tls.argv() if self.tls is not None else ["--insecure-plaintext"]
        if self.cluster_key is not None:
            argv += ["--cluster-key", str(self.cluster_key), "--node", self.node]
        if self.reserve != -1:
            argv += ["--reserve", str(self.reserve)]
        return argv

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> DataServerConfig:
        parser = _Parser(prog="cargohold-dataserver",
                         description="cargohold data server: one per disk")
        parser.add_argument("--dir", type=Path, required=True,
                            help="directory holding the replicas")
        parser.add_argument("--listen", default="127.0.0.1:0",
                            help="HOST:PORT (port 0: stable free port, kept across restarts)")
        parser.add_argument("--ready-file", type=Path, help="written once the server listens")
        parser.add_argument("--log-level", default="INFO")
        parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                            help="connections served at once; more are closed (default "
                                 f"{MAX_CONNECTIONS})")
        parser.add_argument("--frame-timeout", type=float, default=FRAME_TIMEOUT,
                            help="seconds a connection may hold half a frame (default "
                                 f"{FRAME_TIMEOUT:g})")
        parser.add_argument("--cluster-key", type=Path,
                            help="file of the key that signs capabilities: I/O only with one")
        parser.add_argument("--node", default="", help="the node this server runs on")
        parser.add_argument("--reserve", type=int, default=-1,
                            help="bytes of free space kept for writes into chunks in use "
                                 "(default -1: 1%% of the disk, 64 MiB to 4 GiB, at most an "
                                 "eighth; 0: none)")
        _add_tls_arguments(parser)
        args = parser.parse_args(argv)
        host, port = parse_listen(args.listen)
        if args.cluster_key is not None and not args.node:
            raise InvalidArgument(what=f"{parser.prog} arguments",
                                  detail="--cluster-key needs --node")
        return _build(cls, parser.prog, root=args.dir, host=host, port=port,
                      ready_file=args.ready_file, log_level=args.log_level.upper(),
                      max_connections=args.max_connections, frame_timeout=args.frame_timeout,
                      tls=_tls_files(parser.prog, args), cluster_key=args.cluster_key,
                      node=args.node, reserve=args.reserve)
