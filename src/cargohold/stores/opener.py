"""Opening a metadata store by URL (the one module that knows every implementation)."""

from __future__ import annotations

from cargohold import errors
from cargohold.config import TlsFiles
from cargohold.stores.metadata import MemoryStore, MetadataStore
from cargohold.stores.sqlite import SqliteStore


def open_store(url: str, tls: TlsFiles | None = None, password: str = "") -> MetadataStore:
    """Open the store named by ``url``: ``memory://``, ``sqlite:///absolute/path.db``,
    ``etcds://[USER@]host:port[,host:port...]`` (the members of one etcd cluster, over TLS
    with ``tls``: this host's files; signed in as USER with ``password`` if given) or
    ``etcd://...`` (the same in plaintext)."""
    if url == "memory://":
        return MemoryStore()
    if url.startswith(("etcd://", "etcds://")):
        secure = url.startswith("etcds://")
        if secure and tls is None:
            raise errors.InvalidArgument(
                what="metadata URL", detail=f"{url!r}: etcd over TLS needs this host's TLS "
                "files (a node's --tls-dir, or --tls-ca/--tls-cert/--tls-key)")
        members = url.split("://", 1)[1]
        user, at, rest = members.partition("@")
        if at:
            members = rest
        else:
            user = ""
        endpoints = members.split(",")
        if not all(endpoints) or any("/" in e for e in endpoints):
            raise errors.InvalidArgument(
                what="metadata URL",
                detail=f"{url!r} does not list etcd members; "
                "write it like etcds://10.0.0.1:2379,10.0.0.2:2379",
            )
        from cargohold.stores.etcd import EtcdStore  # gRPC: loaded only for etcd (~35 ms)

        return EtcdStore(endpoints, tls=tls if secure else None, user=user, password=password)
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
        "or etcds://host:port[,host:port...] (etcd:// in plaintext)",
    )
