"""Typed configuration, read in one place; the rest of the code receives these objects."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cargohold.errors import InvalidArgument

DEFAULT_STATE_DIR = Path("/var/lib/cargohold")
DEFAULT_API = "unix:///run/cargohold/api.sock"
DEFAULT_DOCKER_SOCKET = Path("/run/docker/plugins/cargohold.sock")
HOST_ENV = "CARGOHOLD_HOST"
TOKEN_ENV = "CARGOHOLD_TOKEN"


class Endpoint(BaseModel):
    """An API endpoint: ``unix:///path`` or ``tcp://host:port``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str

    @field_validator("url")
    @classmethod
    def _check(cls, url: str) -> str:
        parsed = urlparse(url)
        if parsed.scheme == "unix" and parsed.path:
            return url
        if parsed.scheme in ("tcp", "http") and parsed.hostname and parsed.port:
            return url
        raise ValueError(f"{url!r} is not unix:///PATH or tcp://HOST:PORT")

    @property
    def is_unix(self) -> bool:
        return self.url.startswith("unix://")

    @property
    def path(self) -> str:
        return urlparse(self.url).path

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlparse(self.url).port or 0


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default_factory=socket.gethostname)
    state_dir: Path = DEFAULT_STATE_DIR
    data_dirs: list[Path] = []
    metadata: str = ""
    api: list[Endpoint] = [Endpoint(url=DEFAULT_API)]
    token: str = ""  # required on TCP endpoints
    docker_socket: Path | None = DEFAULT_DOCKER_SOCKET  # None: no Docker volume plugin
    csi_endpoint: Endpoint | None = None  # unix:///PATH of the CSI driver; None: no CSI
    data_host: str = "127.0.0.1"  # address the data servers listen on and advertise
    lease_ttl: float = Field(default=10.0, ge=2.0)  # seconds; keepalive every second
    server_check_interval: float = 1.0
    overprovision: float = Field(default=2.0, ge=0.0)  # provisioned/capacity; 0: no limit
    rebuild_after: float = Field(default=600.0, ge=0.0)  # seconds down before a rebuild
    rebuild_rate: float = Field(default=0.0, ge=0.0)  # bytes/s of resync copies; 0: any
    auto_rebalance: bool = False  # move replicas onto new data servers by themselves
    scrub_every: float = Field(default=7 * 86400.0, ge=0.0)  # 0: no background scrub
    scrub_rate: float = Field(default=50 << 20, ge=0.0)  # bytes/s of a background scrub; 0: any

    def model_post_init(self, _context: object) -> None:
        if not self.metadata:
            self.metadata = f"sqlite://{(self.state_dir / 'meta.db').absolute()}"
        if any(not e.is_unix for e in self.api) and not self.token:
            raise InvalidArgument(what="API endpoint",
                                  detail="a TCP API needs a bearer token (--token or "
                                         f"{TOKEN_ENV})")
        if self.csi_endpoint is not None and not self.csi_endpoint.is_unix:
            raise InvalidArgument(what="CSI endpoint",
                                  detail="the CSI driver serves a unix socket: unix:///PATH")


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: Endpoint = Endpoint(url=DEFAULT_API)
    token: str = ""


def client_config(host: str | None, token: str | None) -> ClientConfig:
    """What the CLI uses: flags first, then ``CARGOHOLD_HOST``/``CARGOHOLD_TOKEN``."""
    url = host or os.environ.get(HOST_ENV) or DEFAULT_API
    try:
        endpoint = Endpoint(url=url)
    except ValueError as e:
        raise InvalidArgument(what="--host", detail=str(e)) from None
    return ClientConfig(host=endpoint, token=token or os.environ.get(TOKEN_ENV, ""))
