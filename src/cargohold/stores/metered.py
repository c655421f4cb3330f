"""A metadata store that counts its requests: how many, how long, how many failed.

The node wraps its store in one (``MeteredStore(open_store(...))``) and exports the counts
as metrics; everything else sees the store as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Sequence
from time import perf_counter
from typing import TypeVar

from cargohold.core.iostats import OpStats
from cargohold.errors import CargoholdError
from cargohold.stores.metadata import (
    Compare,
    KeyValue,
    MetadataStore,
    Op,
    TxnResult,
    WatchEvent,
)

T = TypeVar("T")

#: The operations counted, by the name the metrics give them.
OPERATIONS = ("get", "range", "put", "delete", "txn", "revision", "grant_lease", "keepalive",
              "revoke_lease", "lease_alive")


class MeteredStore(MetadataStore):
    def __init__(self, inner: MetadataStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.requests = {op: OpStats() for op in OPERATIONS}

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        started = perf_counter()
        try:
            result = await call
        except CargoholdError:
            self.requests[op].failed(perf_counter() - started)
            raise
        self.requests[op].done(0, perf_counter() - started)
        return result

    async def get(self, key: str) -> KeyValue | None:
        return await self._timed("get", self.inner.get(key))

    async def range(self, prefix: str) -> list[KeyValue]:
        return await self._timed("range", self.inner.range(prefix))

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return await self._timed("put", self.inner.put(key, value, lease))

    async def delete(self, key: str, prefix: bool = False) -> int:
        return await self._timed("delete", self.inner.delete(key, prefix))

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        return await self._timed("txn", self.inner.txn(compares, success, failure))

    async def revision(self) -> int:
        return await self._timed("revision", self.inner.revision())

    async def grant_lease(self, ttl: float) -> int:
        return await self._timed("grant_lease", self.inner.grant_lease(ttl))

    async def keepalive(self, lease: int) -> float:
        return await self._timed("keepalive", self.inner.keepalive(lease))

    async def revoke_lease(self, lease: int) -> None:
        await self._timed("revoke_lease", self.inner.revoke_lease(lease))

    async def lease_alive(self, lease: int) -> bool:
        return await self._timed("lease_alive", self.inner.lease_alive(lease))

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        return self.inner.watch(prefix, start_revision)

    async def close(self) -> None:
        await self.inner.close()
