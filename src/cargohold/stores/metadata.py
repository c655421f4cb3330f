"""The metadata store: its interface and the in-memory reference implementation.

The SQLite and etcd stores implement it in their own modules; ``stores.opener.open_store``
picks one by URL.

The semantics are etcd v3's, so that SQLite, memory and etcd behave alike:

- One store-wide revision counter. It starts at 0 (empty store) and goes up by one for every
  change: a put, a delete that removed something, a transaction that changed something (once
  for the whole transaction), the expiry or revocation of a lease that still had keys.
- Each key carries ``create_revision``, ``mod_revision`` and ``version`` (puts since the key
  was created, so 1 after the first put).
- A lease has a TTL in seconds, measured on the wall clock (``time.time()``) so that several
  processes agree. When it expires or is revoked, its keys are deleted (delete events).
  Expiry may be applied lazily, but a read never returns a key whose lease has expired.
- A transaction checks all ``Compare`` conditions and then atomically runs either the
  ``success`` or the ``failure`` operations. As in etcd, one transaction may not put the same
  key twice, nor put a key that one of its deletes covers.
- ``watch`` replays retained changes after a revision, then follows new ones, in revision
  order. Only the newest ``EVENT_HISTORY`` revisions are retained; a watch that needs older
  ones fails with ``InvalidArgument`` (etcd's "compacted"): read the current state and watch
  again from its revision.

Keys are non-empty ``str`` (compared and sorted by code point), values are ``bytes``.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from cargohold import errors

EVENT_HISTORY = 10_000
"""How many of the newest revisions a store keeps for watches."""


def check_key(key: str, what: str = "key") -> None:
    """Raise InvalidArgument unless ``key`` is a non-empty string encodable as UTF-8."""
    if not isinstance(key, str) or not key:
        raise errors.InvalidArgument(what=what, detail=f"{key!r} is not a non-empty string")
    check_prefix(key, what)


def check_prefix(prefix: str, what: str = "key prefix") -> None:
    """Raise InvalidArgument unless ``prefix`` is a string encodable as UTF-8 ("" is fine)."""
    if not isinstance(prefix, str):
        raise errors.InvalidArgument(what=what, detail=f"{prefix!r} is not a string")
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError as e:
        raise errors.InvalidArgument(what=what, detail=f"{prefix!r} is not valid UTF-8") from e


def check_revision(revision: int, what: str = "revision") -> None:
    if not isinstance(revision, int) or revision < 0:
        raise errors.InvalidArgument(what=what, detail=f"{revision!r} is not an integer >= 0")


def check_ttl(ttl: float) -> None:
    if not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise errors.InvalidArgument(what="lease TTL", detail=f"{ttl!r} is not a number > 0")


@dataclass(frozen=True)
class KeyValue:
    """A key as stored. ``lease`` is 0 when the key has no lease."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction.

    ``mod_revision``: the key's mod_revision must equal it; 0 means "the key must not exist".
    ``value``: the key must exist and hold exactly this value. When both are given, both
    must hold.
    """

    key: str
    mod_revision: int | None = None
    value: bytes | None = None

    def __post_init__(self) -> None:
        check_key(self.key)
        if self.mod_revision is None and self.value is None:
            raise errors.InvalidArgument(
                what="compare", detail=f"give mod_revision or value for key {self.key!r}"
            )
        if self.mod_revision is not None:
            check_revision(self.mod_revision, "compare mod_revision")
        if self.value is not None and not isinstance(self.value, bytes):
            raise errors.InvalidArgument(what="compare value", detail="expected bytes")

    @classmethod
    def absent(cls, key: str) -> Compare:
        """The key must not exist."""
        return cls(key, mod_revision=0)

    @classmethod
    def revision(cls, key: str, mod_revision: int) -> Compare:
        """The key's mod_revision must be ``mod_revision`` (0: must not exist)."""
        return cls(key, mod_revision=mod_revision)

    @classmethod
    def equals(cls, key: str, value: bytes) -> Compare:
        """The key must exist and hold ``value``."""
        return cls(key, value=value)

    def holds(self, kv: KeyValue | None) -> bool:
        """Whether the condition holds for the key's current state (None: absent)."""
        if self.mod_revision is not None:
            if (kv.mod_revision if kv is not None else 0) != self.mod_revision:
                return False
        if self.value is not None:
            if kv is None or kv.value != self.value:
                return False
        return True


@dataclass(frozen=True)
class Put:
    """Transaction operation: set ``key`` to ``value``, attached to ``lease`` (0: none)."""

    key: str
    value: bytes
    lease: int = 0

    def __post_init__(self) -> None:
        check_key(self.key)
        if not isinstance(self.value, bytes):
            raise errors.InvalidArgument(
                what="value", detail=f"expected bytes, got {type(self.value).__name__}"
            )
        check_revision(self.lease, "lease")


@dataclass(frozen=True)
class Delete:
    """Transaction operation: delete ``key``, or every key starting with it if ``prefix``."""

    key: str
    prefix: bool = False

    def __post_init__(self) -> None:
        if self.prefix:
            check_prefix(self.key)
        else:
            check_key(self.key)

    def covers(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key


Op = Put | Delete


@dataclass(frozen=True)
class TxnResult:
    """Outcome of a transaction; ``revision`` is the store revision after it."""

    succeeded: bool
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    """One change. For a delete, ``kv`` has the key, ``value == b""``, ``mod_revision`` = the
    delete's revision, and create_revision, version and lease 0 (as etcd reports them)."""

    type: Literal["put", "delete"]
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


def deleted(key: str, revision: int) -> KeyValue:
    """The ``kv`` of a delete event."""
    return KeyValue(key, b"", 0, revision, 0, 0)


def check_txn(compares: Sequence[Compare], *branches: Sequence[Op]) -> None:
    """Reject what etcd rejects: wrong types, and in one branch a key put twice or a key
    both put and deleted."""
    for c in compares:
        if not isinstance(c, Compare):
            raise errors.InvalidArgument(what="transaction compare", detail=repr(c))
    for ops in branches:
        puts: set[str] = set()
        for op in ops:
            if not isinstance(op, Put | Delete):
                raise errors.InvalidArgument(what="transaction operation", detail=repr(op))
            if isinstance(op, Put):
                if op.key in puts:
                    raise errors.InvalidArgument(
                        what="transaction", detail=f"key {op.key!r} is put twice"
                    )
                puts.add(op.key)
        for op in ops:
            if isinstance(op, Delete) and any(op.covers(key) for key in puts):
                raise errors.InvalidArgument(
                    what="transaction", detail=f"a key under {op.key!r} is put and deleted"
                )


def compacted(start: int, oldest: int) -> errors.InvalidArgument:
    """The error of a watch whose next events are no longer retained."""
    return errors.InvalidArgument(
        what="watch start revision",
        detail=f"changes up to revision {oldest} are no longer retained (needed from "
        f"{start + 1}); read the current state and watch from its revision",
    )


class MetadataStore(abc.ABC):
    """A key-value store with revisions, leases, transactions and watches (see module doc).

    Use as ``async with open_store(url) as store: ...`` or call ``close()``.
    Errors: ``InvalidArgument`` for bad input, ``LeaseExpired``, ``MetadataUnavailable``
    when the backend cannot be reached (or the store is closed).
    """

    url: str

    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None:
        """The key, or None if it does not exist."""

    @abc.abstractmethod
    async def range(self, prefix: str) -> list[KeyValue]:
        """Every key starting with ``prefix``, sorted by key; "" means all keys."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Set a key; return the new revision. LeaseExpired if ``lease`` is not alive."""

    @abc.abstractmethod
    async def delete(self, key: str, prefix: bool = False) -> int:
        """Delete a key (or all keys starting with it); return how many were deleted.
        Deleting nothing does not change the revision."""

    @abc.abstractmethod
    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """If every compare holds run ``success``, else ``failure``; atomically."""

    @abc.abstractmethod
    async def revision(self) -> int:
        """The current store revision (0 for a store that never changed)."""

    @abc.abstractmethod
    async def grant_lease(self, ttl: float) -> int:
        """Create a lease that expires ``ttl`` seconds from now; return its id (> 0)."""

    @abc.abstractmethod
    async def keepalive(self, lease: int) -> float:
        """Restart the lease's TTL; return it. LeaseExpired if the lease is gone."""

    @abc.abstractmethod
    async def revoke_lease(self, lease: int) -> None:
        """End the lease now and delete its keys. An unknown lease is fine."""

    @abc.abstractmethod
    async def lease_alive(self, lease: int) -> bool:
        """Whether the lease exists and has not expired."""

    @abc.abstractmethod
    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        """Changes to keys starting with ``prefix`` with revision > ``start_revision``,
        retained ones first, then live ones, in revision order (events of one transaction
        in operation order). ``start_revision`` 0 means "changes after this call". The
        iterator ends when the store is closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release resources and end open watches. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# --- in-memory reference implementation -----------------------------------------------


@dataclass
class _Lease:
    ttl: float
    expiry: float
    keys: set[str]


def _event_revision(event: WatchEvent) -> int:
    return event.kv.mod_revision


class MemoryStore(MetadataStore):
    """The reference implementation, for unit tests and single-process use.

    Not thread-safe: use it from one event loop.
    """

    def __init__(self, *, event_history: int = EVENT_HISTORY) -> None:
        self.url = "memory://"
        self._history = max(1, event_history)
        self._kv: dict[str, KeyValue] = {}
        self._revision = 0
        self._compacted = 0  # events with revision <= this are gone
        self._events: list[WatchEvent] = []
        self._leases: dict[int, _Lease] = {}
        self._last_lease = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._closed = False

    # -- internals

    def _begin(self) -> float:
        """Check the store is open, apply lease expiry, return now."""
        if self._closed:
            raise errors.MetadataUnavailable(url=self.url, detail="the store is closed")
        now = time.time()
        self._expire(now)
        return now

    def _expire(self, now: float) -> None:
        expired = sorted((lease.expiry, lid) for lid, lease in self._leases.items())
        for expiry, lid in expired:
            if expiry > now:
                break
            self._drop_lease(lid)

    def _drop_lease(self, lid: int) -> None:
        lease = self._leases.pop(lid, None)
        if lease is None or not lease.keys:
            return
        revision = self._revision + 1
        events = []
        for key in sorted(lease.keys):
            del self._kv[key]
            events.append(WatchEvent("delete", deleted(key, revision)))
        self._commit(revision, events)

    def _commit(self, revision: int, events: list[WatchEvent]) -> None:
        self._revision = revision
        self._events.extend(events)
        if revision - self._compacted > self._history:
            self._compacted = revision - self._history
            cut = bisect.bisect_right(self._events, self._compacted, key=_event_revision)
            del self._events[:cut]
        self._notify()

    def _notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    def _remove(self, key: str) -> None:
        kv = self._kv.pop(key)
        if kv.lease and kv.lease in self._leases:
            self._leases[kv.lease].keys.discard(key)

    def _apply(self, ops: Sequence[Op]) -> int:
        """Run one branch as one revision; return the number of deleted keys."""
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise errors.LeaseExpired(lease=op.lease)
        revision = self._revision + 1
        events: list[WatchEvent] = []
        count = 0
        for op in ops:
            if isinstance(op, Put):
                old = self._kv.get(op.key)
                if old is not None:
                    self._remove(op.key)
                kv = KeyValue(
                    op.key,
                    op.value,
                    old.create_revision if old else revision,
                    revision,
                    old.version + 1 if old else 1,
                    op.lease,
                )
                self._kv[op.key] = kv
                if op.lease:
                    self._leases[op.lease].keys.add(op.key)
                events.append(WatchEvent("put", kv))
            else:
                if op.prefix:
                    keys = sorted(k for k in self._kv if k.startswith(op.key))
                else:
                    keys = [op.key] if op.key in self._kv else []
                for key in keys:
                    self._remove(key)
                    events.append(WatchEvent("delete", deleted(key, revision)))
                count += len(keys)
        if events:
            self._commit(revision, events)
        return count

    def _next_expiry_in(self) -> float | None:
        if not self._leases:
            return None
        soonest = min(lease.expiry for lease in self._leases.values())
        return max(0.0, soonest - time.time()) + 0.005

    # -- interface

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        self._begin()
        return self._kv.get(key)

    async def range(self, prefix: str) -> list[KeyValue]:
        check_prefix(prefix)
        self._begin()
        return [self._kv[k] for k in sorted(self._kv) if k.startswith(prefix)]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        op = Put(key, value, lease)
        self._begin()
        self._apply([op])
        return self._revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        op = Delete(key, prefix)
        self._begin()
        return self._apply([op])

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        check_txn(compares, success, failure)
        self._begin()
        ok = all(c.holds(self._kv.get(c.key)) for c in compares)
        self._apply(success if ok else failure)
        return TxnResult(ok, self._revision)

    async def revision(self) -> int:
        self._begin()
        return self._revision

    async def grant_lease(self, ttl: float) -> int:
        check_ttl(ttl)
        now = self._begin()
        self._last_lease += 1
        self._leases[self._last_lease] = _Lease(float(ttl), now + ttl, set())
        self._notify()  # watches recompute when to apply expiry
        return self._last_lease

    async def keepalive(self, lease: int) -> float:
        now = self._begin()
        found = self._leases.get(lease)
        if found is None:
            raise errors.LeaseExpired(lease=lease)
        found.expiry = now + found.ttl
        return found.ttl

    async def revoke_lease(self, lease: int) -> None:
        self._begin()
        self._drop_lease(lease)

    async def lease_alive(self, lease: int) -> bool:
        self._begin()
        return lease in self._leases

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        check_prefix(prefix)
        check_revision(start_revision, "watch start revision")
        self._begin()
        return self._watch(prefix, start_revision or self._revision)

    async def _watch(self, prefix: str, last: int) -> AsyncIterator[WatchEvent]:
        loop = asyncio.get_running_loop()
        while not self._closed:
            self._expire(time.time())
            if last < self._compacted:
                raise compacted(last, self._compacted)
            start = bisect.bisect_right(self._events, last, key=_event_revision)
            batch = [e for e in self._events[start:] if e.kv.key.startswith(prefix)]
            last = max(last, self._revision)
            if batch:
                for event in batch:
                    yield event
                    if self._closed:
                        return
                continue
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.add(fut)
            try:
                await asyncio.wait({fut}, timeout=self._next_expiry_in())
            finally:
                self._waiters.discard(fut)

    async def close(self) -> None:
        self._closed = True
        self._notify()
