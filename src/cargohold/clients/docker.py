"""A small client of the Docker Engine API (what moving a container between clusters uses):
inspect, create, start and remove containers, on a unix socket or TCP (with TLS)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from cargohold.errors import DockerUnavailable, InvalidArgument

DEFAULT_DOCKER = "unix:///var/run/docker.sock"
#: The API version asked for (Docker 20.10 and later answer it).
API = "/v1.41"


class DockerClient:
    def __init__(self, url: str = DEFAULT_DOCKER, ca: Path | None = None,
                 cert: Path | None = None, key: Path | None = None) -> None:
        self.url = url
        if url.startswith("unix://"):
            transport = httpx.HTTPTransport(uds=url.removeprefix("unix://"))
            base = "http://docker"
        elif url.startswith("tcp://") or url.startswith("https://"):
            context = ssl.create_default_context(cafile=str(ca) if ca else None)
            if cert is not None and key is not None:
                context.load_cert_chain(str(cert), str(key))
            transport = httpx.HTTPTransport(verify=context)
            base = "https://" + url.split("://", 1)[1]
        else:
            raise InvalidArgument(what="Docker host", detail=f"{url!r}: unix:///PATH or "
                                  "tcp://HOST:PORT (TLS)")
        self._http = httpx.Client(transport=transport, base_url=base + API,
                                  timeout=httpx.Timeout(10.0, read=120.0))

    def __enter__(self) -> DockerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None,
              params: dict[str, str] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.HTTPError as e:
            raise DockerUnavailable(url=self.url, detail=str(e) or type(e).__name__) from None
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            if response.status_code == 404:
                raise InvalidArgument(what="Docker", detail=f"{self.url}: {message}")
            raise DockerUnavailable(url=self.url, detail=f"it answered "
                                    f"{response.status_code}: {message}")
        return response.json() if response.content else None

    def inspect(self, container: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/containers/{quote(container)}/json"))

    def has_image(self, image: str) -> bool:
        try:
            self._call("GET", f"/images/{quote(image, safe='')}/json")
        except InvalidArgument:
            return False
        return True

    def create(self, name: str, config: dict[str, Any]) -> str:
        made = self._call("POST", "/containers/create", config, params={"name": name})
        return str(made["Id"])

    def start(self, container: str) -> None:
        self._call("POST", f"/containers/{quote(container)}/start")

    def remove(self, container: str, force: bool = False) -> None:
        self._call("DELETE", f"/containers/{quote(container)}",
                   params={"force": "true" if force else "false"})
