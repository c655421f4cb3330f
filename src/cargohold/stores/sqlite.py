"""SQLite implementation of the metadata store (see cargohold.stores.metadata).

One database file may be shared by several processes, each with its own SqliteStore. The
file is in WAL mode; every write is a ``BEGIN IMMEDIATE`` transaction, so writers from all
processes serialise on SQLite's lock (waiting up to ``busy_timeout``), and the store
revision lives in the database. Every sqlite call runs in one worker thread per store, so
the event loop never blocks. Watches poll an events table; lease expiry is applied by
whichever process touches the store first after the deadline.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from cargohold import errors
from cargohold.core.retry import Backoff, retry_blocking
from cargohold.stores.metadata import (
    EVENT_HISTORY,
    Compare,
    Delete,
    KeyValue,
    MetadataStore,
    Op,
    Put,
    TxnResult,
    WatchEvent,
    check_key,
    check_prefix,
    check_revision,
    check_ttl,
    check_txn,
    compacted,
)

T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0)",
    # keys are UTF-8 blobs: byte order is code point order, and prefix ranges are exact
    "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL,"
    " create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL,"
    " version INTEGER NOT NULL, lease INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0",
    # AUTOINCREMENT: a lease id is never reused, so a stale holder cannot revive it
    "CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " ttl REAL NOT NULL, expiry REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expiry)",
    "CREATE TABLE IF NOT EXISTS events (revision INTEGER NOT NULL, idx INTEGER NOT NULL,"
    " type TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,"
    " create_revision INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL,"
    " PRIMARY KEY (revision, idx)) WITHOUT ROWID",
)

_KV_COLUMNS = "key, value, create_revision, mod_revision, version, lease"
_ALIVE = "(lease = 0 OR EXISTS (SELECT 1 FROM leases WHERE id = kv.lease AND expiry > ?))"


def _key_range(prefix: bytes) -> tuple[str, tuple[bytes, ...]]:
    """SQL condition and parameters selecting the keys that start with ``prefix``."""
    if not prefix:
        return "1", ()
    # UTF-8 never contains 0xff, so incrementing the last byte gives the exclusive end
    return "key >= ? AND key < ?", (prefix, prefix[:-1] + bytes([prefix[-1] + 1]))


def _kv(row: Sequence[Any]) -> KeyValue:
    return KeyValue(bytes(row[0]).decode("utf-8"), bytes(row[1]), *row[2:6])


def _is_busy(e: sqlite3.OperationalError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(e) or "busy" in str(e)


def _meta(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0])


class _Batch:
    """The changes of one revision inside an open write transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.revision = _meta(conn, "revision") + 1
        self.count = 0

    def event(self, type_: str, kv: KeyValue) -> None:
        self.conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self.revision,
                self.count,
                type_,
                kv.key.encode("utf-8"),
                kv.value,
                kv.create_revision,
                kv.version,
                kv.lease,
            ),
        )
        self.count += 1

    def delete(self, keys: list[bytes]) -> None:
        for key in keys:
            self.conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            self.event("delete", KeyValue(key.decode("utf-8"), b"", 0, self.revision, 0, 0))

    def finish(self, history: int) -> None:
        """Advance the store revision if anything changed; prune old events."""
        if not self.count:
            return
        c = self.conn
        c.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (self.revision,))
        oldest = self.revision - history
        if oldest > _meta(c, "compacted"):
            c.execute("DELETE FROM events WHERE revision <= ?", (oldest,))
            c.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (oldest,))


class SqliteStore(MetadataStore):
    """Metadata store in the SQLite file at ``path`` (created if missing).

    ``busy_timeout``: seconds to wait for another process's write lock before failing with
    MetadataUnavailable. ``poll_interval``: seconds between watch polls. ``event_history``:
    revisions kept for watches.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        poll_interval: float = 0.05,
        event_history: int = EVENT_HISTORY,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.url = "sqlite://" + self.path
        self._busy_timeout = busy_timeout
        self._poll_interval = poll_interval
        self._history = max(1, event_history)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cargohold-sqlite")
        self._conn: sqlite3.Connection | None = None  # used only in the worker thread
        self._thread_closed = False  # set in the worker thread by close()
        self._closed = False
        self._waiters: set[asyncio.Future[None]] = set()

    # -- worker thread side

    def _closed_error(self) -> errors.MetadataUnavailable:
        return errors.MetadataUnavailable(url=self.url, detail="the store is closed")

    def _connect(self) -> sqlite3.Connection:
        if self._thread_closed:
            raise self._closed_error()
        if self._conn is not None:
            return self._conn
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise errors.MetadataUnavailable(
                    url=self.url, detail=f"cannot use WAL mode (journal mode is {mode})"
                )
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)``; retry it while SQLite reports busy, for up to busy_timeout.

        Some lock conflicts (switching a new file to WAL, WAL recovery) fail at once instead
        of waiting in SQLite's busy handler. A failed job has rolled back, so rerunning it
        is safe.
        """
        busy = Backoff(first=0.001, most=0.05, timeout=self._busy_timeout)
        try:
            return retry_blocking(lambda: fn(self._connect(), *args), busy,
                                  temporary=lambda e: isinstance(e, sqlite3.OperationalError)
                                  and _is_busy(e))
        except sqlite3.OperationalError as e:
            raise errors.MetadataUnavailable(url=self.url, detail=str(e)) from e
        except sqlite3.DatabaseError as e:  # e.g. "file is not a database"
            if isinstance(e, sqlite3.IntegrityError | sqlite3.ProgrammingError):
                raise
            raise errors.MetadataUnavailable(url=self.url, detail=str(e)) from e

    def _write(self, conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a write transaction, after applying lease expiry.

        ``fn`` raises CargoholdError only before it changes anything, so the transaction
        still commits (keeping the expiry work) before the error propagates.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._expire(conn, time.time())
            try:
                result = fn(conn, *args)
            except errors.CargoholdError:
                conn.execute("COMMIT")
                raise
            conn.execute("COMMIT")
            return result
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _expire(self, conn: sqlite3.Connection, now: float) -> None:
        rows = conn.execute(
            "SELECT id FROM leases WHERE expiry <= ? ORDER BY expiry, id", (now,)
        ).fetchall()
        for (lease,) in rows:
            self._drop_lease(conn, lease)

    def _drop_lease(self, conn: sqlite3.Connection, lease: int) -> None:
        conn.execute("DELETE FROM leases WHERE id = ?", (lease,))
        keys = [
            bytes(r[0])
            for r in conn.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))
        ]
        batch = _Batch(conn)
        batch.delete(keys)
        batch.finish(self._history)

    def _expire_if_due(self, conn: sqlite3.Connection) -> float:
        """Apply lease expiry if a lease is past its deadline; return now."""
        now = time.time()
        if conn.execute("SELECT 1 FROM leases WHERE expiry <= ? LIMIT 1", (now,)).fetchone():
            self._write(conn, lambda c: None)
        return now

    def _get_job(self, conn: sqlite3.Connection, key: str) -> KeyValue | None:
        now = self._expire_if_due(conn)
        row = conn.execute(
            f"SELECT {_KV_COLUMNS} FROM kv WHERE key = ? AND {_ALIVE}",
            (key.encode("utf-8"), now),
        ).fetchone()
        return _kv(row) if row else None

    def _range_job(self, conn: sqlite3.Connection, prefix: str) -> list[KeyValue]:
        now = self._expire_if_due(conn)
        where, params = _key_range(prefix.encode("utf-8"))
        rows = conn.execute(
            f"SELECT {_KV_COLUMNS} FROM kv WHERE {where} AND {_ALIVE} ORDER BY key",
            (*params, now),
        ).fetchall()
        return [_kv(r) for r in rows]

    def _revision_job(self, conn: sqlite3.Connection) -> int:
        self._expire_if_due(conn)
        return _meta(conn, "revision")

    def _row(self, conn: sqlite3.Connection, key: str) -> KeyValue | None:
        row = conn.execute(
            f"SELECT {_KV_COLUMNS} FROM kv WHERE key = ?", (key.encode("utf-8"),)
        ).fetchone()
        return _kv(row) if row else None

    def _apply(self, conn: sqlite3.Connection, ops: Sequence[Op]) -> tuple[int, int]:
        """Run one branch as one revision (inside _write); return (deleted keys, revision
        after)."""
        for op in ops:
            if isinstance(op, Put) and op.lease:
                if not conn.execute("SELECT 1 FROM leases WHERE id = ? AND expiry > ?",
                                    (op.lease, time.time())).fetchone():
                    raise errors.LeaseExpired(lease=op.lease)
        batch = _Batch(conn)
        count = 0
        for op in ops:
            if isinstance(op, Put):
                old = self._row(conn, op.key)
                kv = KeyValue(
                    op.key,
                    op.value,
                    old.create_revision if old else batch.revision,
                    batch.revision,
                    old.version + 1 if old else 1,
                    op.lease,
                )
                conn.execute(
                    "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        op.key.encode("utf-8"),
                        kv.value,
                        kv.create_revision,
                        kv.mod_revision,
                        kv.version,
                        kv.lease,
                    ),
                )
                batch.event("put", kv)
            elif op.prefix:
                where, params = _key_range(op.key.encode("utf-8"))
                keys = [
                    bytes(r[0])
                    for r in conn.execute(f"SELECT key FROM kv WHERE {where} ORDER BY key", params)
                ]
                batch.delete(keys)
                count += len(keys)
            elif self._row(conn, op.key) is not None:
                batch.delete([op.key.encode("utf-8")])
                count += 1
        batch.finish(self._history)
        return count, _meta(conn, "revision")

    def _txn_job(
        self,
        conn: sqlite3.Connection,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op],
    ) -> tuple[bool, int]:
        ok = all(c.holds(self._row(conn, c.key)) for c in compares)
        _, revision = self._apply(conn, success if ok else failure)
        return ok, revision

    def _grant_job(self, conn: sqlite3.Connection, ttl: float) -> int:
        cur = conn.execute(
            "INSERT INTO leases (ttl, expiry) VALUES (?, ?)", (ttl, time.time() + ttl)
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _keepalive_job(self, conn: sqlite3.Connection, lease: int) -> float:
        row = conn.execute("SELECT ttl FROM leases WHERE id = ? AND expiry > ?",
                           (lease, time.time())).fetchone()
        if row is None:  # gone, or past its deadline and not yet swept: never revived
            raise errors.LeaseExpired(lease=lease)
        ttl = float(row[0])
        conn.execute("UPDATE leases SET expiry = ? WHERE id = ?", (time.time() + ttl, lease))
        return ttl

    def _alive_job(self, conn: sqlite3.Connection, lease: int) -> bool:
        now = self._expire_if_due(conn)
        row = conn.execute(
            "SELECT 1 FROM leases WHERE id = ? AND expiry > ?", (lease, now)
        ).fetchone()
        return row is not None

    def _poll_job(
        self, conn: sqlite3.Connection, prefix: bytes, last: int
    ) -> tuple[list[WatchEvent], int]:
        self._expire_if_due(conn)
        where, params = _key_range(prefix)
        conn.execute("BEGIN")  # one snapshot for all three reads
        try:
            oldest = _meta(conn, "compacted")
            if last < oldest:
                raise compacted(last, oldest)
            rows = conn.execute(
                "SELECT revision, type, key, value, create_revision, version, lease"
                f" FROM events WHERE revision > ? AND {where} ORDER BY revision, idx",
                (last, *params),
            ).fetchall()
            current = _meta(conn, "revision")
        finally:
            conn.execute("ROLLBACK")
        events = [
            WatchEvent(
                type_,
                KeyValue(bytes(key).decode("utf-8"), bytes(value), create, rev, version, lease),
            )
            for rev, type_, key, value, create, version, lease in rows
        ]
        return events, current

    def _close_job(self) -> None:
        self._thread_closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- event loop side

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._closed:
            raise self._closed_error()
        try:
            return self._executor.submit(self._run, fn, *args)
        except RuntimeError as e:  # executor shut down
            raise self._closed_error() from e

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._submit(fn, *args))

    async def _call_write(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._call(self._write, fn, *args)
        finally:
            self._notify()

    def _notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        return await self._call(self._get_job, key)

    async def range(self, prefix: str) -> list[KeyValue]:
        check_prefix(prefix)
        return await self._call(self._range_job, prefix)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        _, revision = await self._call_write(self._apply, [Put(key, value, lease)])
        return revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        count, _ = await self._call_write(self._apply, [Delete(key, prefix)])
        return count

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        check_txn(compares, success, failure)
        ok, revision = await self._call_write(
            self._txn_job, list(compares), list(success), list(failure)
        )
        return TxnResult(ok, revision)

    async def revision(self) -> int:
        return await self._call(self._revision_job)

    async def grant_lease(self, ttl: float) -> int:
        check_ttl(ttl)
        return await self._call_write(self._grant_job, float(ttl))

    async def keepalive(self, lease: int) -> float:
        return await self._call_write(self._keepalive_job, lease)

    async def revoke_lease(self, lease: int) -> None:
        await self._call_write(self._drop_lease, lease)

    async def lease_alive(self, lease: int) -> bool:
        return await self._call(self._alive_job, lease)

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        check_prefix(prefix)
        check_revision(start_revision, "watch start revision")
        # Read the current revision now, queued ahead of any later call of this store.
        start = self._submit(self._revision_job) if start_revision == 0 else None
        return self._watch(prefix.encode("utf-8"), start_revision, start)

    async def _watch(
        self, prefix: bytes, last: int, start: Future[int] | None
    ) -> AsyncIterator[WatchEvent]:
        loop = asyncio.get_running_loop()
        try:
            if start is not None:
                last = await asyncio.wrap_future(start)
            while not self._closed:
                events, current = await self._call(self._poll_job, prefix, last)
                for event in events:
                    yield event
                    if self._closed:
                        return
                last = max(last, current)
                if events:
                    continue
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.add(fut)
                try:
                    await asyncio.wait({fut}, timeout=self._poll_interval)
                finally:
                    self._waiters.discard(fut)
        except errors.MetadataUnavailable:
            if not self._closed:
                raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._notify()
        try:
            await asyncio.wrap_future(self._executor.submit(self._close_job))
        finally:
            self._executor.shutdown(wait=False)
