"""Client of another cluster's REST API (replication and migration between clusters).

HTTPS with the remote's CA (or the system's) and one of its API tokens; the connections are
kept open for a whole copy (``CONNECTIONS`` at once), and every error the remote answers
comes back as the cargohold error it names.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from cargohold.errors import RemoteUnavailable, from_dict

#: Requests in flight at once to one remote (chunks of a copy).
CONNECTIONS = 8
TIMEOUT = httpx.Timeout(15.0, read=120.0)


class RemoteCluster:
    def __init__(self, name: str, endpoint: str, token: str, ca: str = "") -> None:
        self.name = name
        self.endpoint = endpoint.rstrip("/")
        if self.endpoint.startswith("https://"):
            verify: ssl.SSLContext | bool = ssl.create_default_context(cadata=ca or None)
        elif self.endpoint.startswith("http://"):
            verify = False
        else:
            raise ValueError(f"{endpoint!r}: an https:// (or http://) URL")
        limits = httpx.Limits(max_connections=CONNECTIONS,
                              max_keepalive_connections=CONNECTIONS)
        self._http = httpx.AsyncClient(base_url=self.endpoint, verify=verify, limits=limits,
                                       headers={"Authorization": f"Bearer {token}"},
                                       timeout=TIMEOUT)

    async def __aenter__(self) -> RemoteCluster:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        return self._answer(await self._send(method, path, json=body))

    async def put(self, path: str, data: bytes | memoryview) -> Any:
        """Send raw bytes (a chunk)."""
        return self._answer(await self._send(
            "PUT", path, content=bytes(data),
            headers={"Content-Type": "application/octet-stream"}))

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise RemoteUnavailable(name=self.name, endpoint=self.endpoint,
                                    detail=str(e) or type(e).__name__) from None
        except ssl.SSLError as e:
            raise RemoteUnavailable(name=self.name, endpoint=self.endpoint,
                                    detail=f"TLS: {e}") from None

    def _answer(self, response: httpx.Response) -> Any:
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                error = from_dict(body["error"])
                error.args = (f"On remote cluster {self.name!r}: {error.message}",)
                raise error
            raise RemoteUnavailable(name=self.name, endpoint=self.endpoint,
                                    detail=f"HTTP {response.status_code}")
        return body

