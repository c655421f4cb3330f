"""Client of a node's REST API (what the CLI and the tests use)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from typing import Any

import httpx

from cargohold.config import ClientConfig
from cargohold.errors import CargoholdError, NodeUnavailable, from_dict

TIMEOUT = httpx.Timeout(10.0, read=600.0)  # attach of a big volume runs mkfs


class ApiClient:
    def __init__(self, config: ClientConfig) -> None:
        self.url = config.host.url
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        if config.host.is_unix:
            transport = httpx.HTTPTransport(uds=config.host.path)
            base = "http://cargohold"
        elif config.host.is_plaintext:
            transport = httpx.HTTPTransport()
            base = f"http://{config.host.host}:{config.host.port}"
        else:
            context = ssl.create_default_context(
                cafile=str(config.ca) if config.ca is not None else None)
            transport = httpx.HTTPTransport(verify=context)
            base = f"https://{config.host.host}:{config.host.port}"
        self._http = httpx.Client(transport=transport, base_url=base, headers=headers,
                                  timeout=TIMEOUT)

    def lines(self, path: str) -> Iterator[Any]:
        """Follow a stream of JSON lines (the event stream) until the node closes it."""
        try:
            with self._http.stream("GET", path, timeout=httpx.Timeout(10.0, read=None)) \
                    as response:
                if response.status_code >= 400:
                    response.read()
                    raise from_dict(response.json().get("error", {}))
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise NodeUnavailable(url=self.url, detail=str(e) or type(e).__name__) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise NodeUnavailable(url=self.url, detail=str(e) or type(e).__name__) from None
        if response.status_code == 204:
            return None
        try:
            payload = response.json()
        except ValueError:
            raise CargoholdError(detail=f"HTTP {response.status_code}: {response.text[:200]}") \
                from None
        if response.status_code >= 400:
            raise from_dict(payload.get("error", {}) if isinstance(payload, dict) else {})
        return payload
