"""Opening a metadata store by URL (the one module that knows every implementation)."""

from __future__ import annotations

from cargohold import errors
from cargohold.stores.metadata import MemoryStore, MetadataStore
from cargohold.stores.sqlite import SqliteStore


def open_store(url: str) -> MetadataStore:
    """Open the store named by ``url``: ``memory://``, ``sqlite:///absolute/path.db`` or
    ``etcd://host:port[,host:port...]`` (the members of one etcd cluster)."""
    if url == "memory://":
        return MemoryStore()
    if url.startswith("etcd://"):
        endpoints = url[len("etcd://") :].split(",")
        if not all(endpoints) or any("/" in e for e in endpoints):
            raise errors.InvalidArgument(
                what="metadata URL",
                detail=f"{url!r} does not list etcd members; "
                "write it like etcd://10.0.0.1:2379,10.0.0.2:2379",
            )
        from cargohold.stores.etcd import EtcdStore  # gRPC: loaded only for etcd (~35 ms)

        return EtcdStore(endpoints)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path.startswith("/") or path.endswith("/"):
            raise errors.InvalidArgument(
                what="metadata URL",
                detail=f"{url!r} does not name an absolute file path; "
                "write it like sqlite:///var/lib/cargohold/metadata.db",
            )
        return SqliteStore(path)
    raise errors.InvalidArgument(
        what="metadata URL",
        detail=f"{url!r} is not supported; use memory://, sqlite:///absolute/path.db "
        "or etcd://host:port[,host:port...]",
    )
