"""Other clusters this one copies volumes to: their API endpoint, CA and token.

A remote is checked when added (its API answers over HTTPS with the CA given, takes the
token, and says which cluster it is); its token is kept wrapped under this cluster's key,
like a backup target's key, so the metadata store never holds it in clear.
"""

from __future__ import annotations

import logging
from typing import Any

from cargohold.clients.access import Access
from cargohold.clients.remote import RemoteCluster
from cargohold.core.cipher import unwrap_key, wrap_key
from cargohold.core.models import Remote
from cargohold.core.names import check_name
from cargohold.errors import InvalidArgument, VolumeBusy
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

_KEY_ID = "00" * 15 + "c1"  # the wrapping's associated data (as a volume id would be)


class RemoteService:
    def __init__(self, catalog: Catalog, access: Access | None = None) -> None:
        self.catalog = catalog
        self.access = access

    async def add(self, name: str, endpoint: str, token: str, ca: str = "") -> dict[str, Any]:
        check_name(name)
        if not endpoint.startswith(("https://", "http://")):
            raise InvalidArgument(what="--endpoint", detail=f"{endpoint!r}: give "
                                  "https://HOST:PORT of one of the remote's nodes")
        if not token.strip():
            raise InvalidArgument(what="--token-file", detail="the remote's API token is "
                                  "empty")
        if ca and "BEGIN CERTIFICATE" not in ca:
            raise InvalidArgument(what="--ca", detail="not a PEM certificate")
        async with RemoteCluster(name, endpoint, token.strip(), ca) as remote:
            found = await remote.request("GET", "/v1/cluster")
        if found["id"] == await self.catalog.cluster_id():
            raise InvalidArgument(what="--endpoint", detail=f"{endpoint} is this cluster")
        record = Remote(name=name, endpoint=endpoint, token=self._wrap(token.strip()), ca=ca,
                        cluster=found["id"])
        await self.catalog.add_remote(record)
        log.info("remote %s added: cluster %s at %s", name, found["id"], endpoint)
        return remote_view(record)

    async def listing(self) -> list[dict[str, Any]]:
        return [remote_view(r) for r in await self.catalog.remotes()]

    async def remove(self, name: str) -> None:
        using = [v.name for v in await self.catalog.volumes()
                 if v.replication is not None and v.replication.remote == name]
        if using:
            raise VolumeBusy(name=", ".join(using), state=f"replicated to {name} (stop that "
                             "first: 'cargohold volume replicate NAME --off')")
        await self.catalog.drop_remote(name)

    async def open(self, name: str) -> RemoteCluster:
        """A client of remote ``name`` (close it, or use it with ``async with``)."""
        record = await self.catalog.remote(name)
        return RemoteCluster(name, record.endpoint, self._unwrap(record.token), record.ca)

    def _wrap(self, token: str) -> str:
        if self.access is None or not self.access.key:
            return token  # --insecure-plaintext: no cluster key to wrap it with
        return "wrapped:" + wrap_key(self.access.key, _KEY_ID, token.encode())

    def _unwrap(self, stored: str) -> str:
        if not stored.startswith("wrapped:"):
            return stored
        if self.access is None or not self.access.key:
            raise InvalidArgument(what="remote token", detail="it was kept under a cluster "
                                  "key this node does not have")
        return unwrap_key(self.access.key, _KEY_ID, stored.removeprefix("wrapped:")).decode()


def remote_view(remote: Remote) -> dict[str, Any]:
    """What the API shows of a remote: never its token."""
    return {"name": remote.name, "endpoint": remote.endpoint, "cluster": remote.cluster,
            "ca": bool(remote.ca), "added": remote.added}
