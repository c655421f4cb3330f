"""Contract tests of the metadata store: every implementation must pass all of them."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cargohold import errors
from cargohold.stores.metadata import (
    Compare,
    Delete,
    KeyValue,
    MemoryStore,
    MetadataStore,
    Put,
    TxnResult,
    WatchEvent,
)
from cargohold.stores.opener import open_store
from cargohold.stores.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(30)

Factory = Callable[..., MetadataStore]
Body = Callable[[MetadataStore], Awaitable[None]]


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """A function creating a store of the parametrized kind (kwargs go to its constructor)."""
    if request.param == "memory":
        return MemoryStore
    return lambda **kw: SqliteStore(tmp_path / "meta.db", **kw)


def run(make: Factory, body: Body, **kwargs: object) -> None:
    """Run ``body(store)`` in a fresh event loop; the store is closed whatever happens."""

    async def main() -> None:
        store = make(**kwargs)
        try:
            await asyncio.wait_for(body(store), timeout=20)
        finally:
            await store.close()

    asyncio.run(main())


def run_many(*stores: Callable[[], MetadataStore], body: Callable[..., Awaitable[None]]) -> None:
    """Like run() for several stores at once."""

    async def main() -> None:
        opened: list[MetadataStore] = []
        try:
            for make in stores:
                opened.append(make())
            await asyncio.wait_for(body(*opened), timeout=20)
        finally:
            for store in opened:
                await store.close()

    asyncio.run(main())


async def take(it: AsyncIterator[WatchEvent], n: int, timeout: float = 3.0) -> list[WatchEvent]:
    return [await asyncio.wait_for(anext(it), timeout) for _ in range(n)]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def summary(events: list[WatchEvent]) -> list[tuple[str, str, bytes, int]]:
    return [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events]


# --- get, put, range, delete, revision -------------------------------------------------


def test_empty_store(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        assert await s.revision() == 0
        assert await s.get("a") is None
        assert await s.range("") == []
        assert await s.delete("a") == 0
        assert await s.delete("a", prefix=True) == 0
        assert await s.revision() == 0

    run(make_store, body)


def test_put_get_revisions_and_versions(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        assert await s.put("a", b"1") == 1
        assert await s.get("a") == KeyValue("a", b"1", 1, 1, 1, 0)
        assert await s.put("b", b"") == 2
        assert await s.put("a", b"2") == 3
        assert await s.get("a") == KeyValue("a", b"2", 1, 3, 2, 0)
        assert await s.get("b") == KeyValue("b", b"", 2, 2, 1, 0)
        assert await s.revision() == 3
        # deleting and recreating starts a new life: new create_revision, version 1
        assert await s.delete("a") == 1
        assert await s.revision() == 4
        assert await s.get("a") is None
        assert await s.put("a", b"3") == 5
        assert await s.get("a") == KeyValue("a", b"3", 5, 5, 1, 0)

    run(make_store, body)


def test_values_are_bytes_kept_exactly(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        blob = bytes(range(256)) * 64 + b"\x00"
        await s.put("k/\u00e9\u4e2d\U0001f600", blob)
        kv = await s.get("k/\u00e9\u4e2d\U0001f600")
        assert kv is not None and kv.value == blob and type(kv.value) is bytes

    run(make_store, body)


def test_range_sorted_by_key_and_prefix_exact(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        keys = ["b/2", "a", "b/1", "b", "b/10", "c", "b0", "b/\u00e9", "b/\U0001f600", "b/z"]
        for k in keys:
            await s.put(k, k.encode())
        assert [kv.key for kv in await s.range("")] == sorted(keys)
        assert [kv.key for kv in await s.range("b/")] == sorted(
            k for k in keys if k.startswith("b/")
        )
        assert [kv.key for kv in await s.range("b")] == sorted(k for k in keys if k.startswith("b"))
        assert await s.range("x") == []
        assert [kv.value for kv in await s.range("c")] == [b"c"]

    run(make_store, body)


def test_delete_prefix(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        for k in ["v/1", "v/2", "v/3", "vx", "w"]:
            await s.put(k, b"")
        assert await s.delete("v/", prefix=True) == 3
        assert await s.revision() == 6  # one revision for the whole prefix delete
        assert [kv.key for kv in await s.range("")] == ["vx", "w"]
        assert await s.delete("v", prefix=False) == 0
        assert await s.delete("", prefix=True) == 2
        assert await s.range("") == []

    run(make_store, body)


def test_invalid_arguments(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        with pytest.raises(errors.InvalidArgument):
            await s.put("", b"x")
        with pytest.raises(errors.InvalidArgument):
            await s.put("k", "text")  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument):
            await s.put("\ud800", b"x")  # lone surrogate: not UTF-8
        with pytest.raises(errors.InvalidArgument):
            await s.get("")
        with pytest.raises(errors.InvalidArgument):
            await s.delete("")
        with pytest.raises(errors.InvalidArgument):
            await s.grant_lease(0)
        with pytest.raises(errors.InvalidArgument):
            await s.grant_lease(float("nan"))
        with pytest.raises(errors.InvalidArgument):
            Compare("k")
        with pytest.raises(errors.InvalidArgument):
            Compare.revision("k", -1)
        with pytest.raises(errors.InvalidArgument):
            await s.txn([], [Put("k", b"1"), Put("k", b"2")])
        with pytest.raises(errors.InvalidArgument):
            await s.txn([], [Put("k/1", b"1"), Delete("k/", prefix=True)])
        with pytest.raises(errors.InvalidArgument):
            await s.txn([], [], [Put("k", b"1"), Delete("k")])
        with pytest.raises(errors.InvalidArgument):
            s.watch("", start_revision=-1)
        assert await s.revision() == 0

    run(make_store, body)


def test_closed_store_refuses_work(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        await s.put("a", b"1")
        await s.close()
        await s.close()  # idempotent
        with pytest.raises(errors.MetadataUnavailable):
            await s.get("a")
        with pytest.raises(errors.MetadataUnavailable):
            await s.put("a", b"2")

    run(make_store, body)


# --- transactions ----------------------------------------------------------------------


def test_txn_compare_absent_and_revision(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        r = await s.txn([Compare.absent("k")], [Put("k", b"1")], [Put("other", b"x")])
        assert r == TxnResult(True, 1)
        r = await s.txn([Compare.absent("k")], [Put("k", b"2")], [Put("lost", b"x")])
        assert r == TxnResult(False, 2)
        assert (await s.get("k")).value == b"1"  # type: ignore[union-attr]
        assert await s.get("lost") is not None

        assert not (await s.txn([Compare.revision("k", 2)], [Put("k", b"3")])).succeeded
        r = await s.txn([Compare.revision("k", 1)], [Put("k", b"3")])
        assert r == TxnResult(True, 3)
        assert await s.get("k") == KeyValue("k", b"3", 1, 3, 2, 0)
        assert (await s.txn([Compare.revision("nope", 0)], [])).succeeded

    run(make_store, body)


def test_txn_compare_value(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        assert not (await s.txn([Compare.equals("k", b"")], [Put("k", b"x")])).succeeded
        assert await s.get("k") is None  # value compare needs the key to exist
        await s.put("k", b"a")
        assert not (await s.txn([Compare.equals("k", b"b")], [Delete("k")])).succeeded
        assert (await s.txn([Compare.equals("k", b"a")], [Delete("k")])).succeeded
        assert await s.get("k") is None
        await s.put("k", b"a")
        rev = (await s.get("k")).mod_revision  # type: ignore[union-attr]
        both = Compare("k", mod_revision=rev, value=b"a")
        assert (await s.txn([both], [Put("k", b"b")])).succeeded
        assert not (await s.txn([both], [Put("k", b"c")])).succeeded

    run(make_store, body)


def test_txn_all_compares_must_hold(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        await s.put("a", b"1")
        conds = [Compare.equals("a", b"1"), Compare.absent("b")]
        assert (await s.txn(conds, [Put("b", b"1")])).succeeded
        assert not (await s.txn(conds, [Put("c", b"1")], [Delete("a")])).succeeded
        assert await s.get("c") is None
        assert await s.get("a") is None

    run(make_store, body)


def test_txn_is_one_revision_and_atomic(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        await s.put("old/1", b"")
        await s.put("old/2", b"")
        w = s.watch("")
        r = await s.txn([], [Put("x", b"1"), Put("y", b"2"), Delete("old/", prefix=True)])
        assert r == TxnResult(True, 3)
        assert await s.revision() == 3
        assert (await s.get("x")) == KeyValue("x", b"1", 3, 3, 1, 0)
        assert (await s.get("y")).mod_revision == 3  # type: ignore[union-attr]
        events = await take(w, 4)
        assert summary(events) == [
            ("put", "x", b"1", 3),
            ("put", "y", b"2", 3),
            ("delete", "old/1", b"", 3),
            ("delete", "old/2", b"", 3),
        ]
        # a txn that changes nothing does not advance the revision
        assert await s.txn([Compare.absent("x")], [Put("z", b"")]) == TxnResult(False, 3)
        assert await s.txn([], [Delete("missing")]) == TxnResult(True, 3)
        # a failing op (dead lease) leaves nothing behind
        with pytest.raises(errors.LeaseExpired):
            await s.txn([], [Put("a", b"1"), Put("b", b"2", lease=12345)])
        assert await s.get("a") is None
        assert await s.revision() == 3

    run(make_store, body)


# --- leases ----------------------------------------------------------------------------


def test_lease_grant_keepalive_revoke(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        lease = await s.grant_lease(30)
        other = await s.grant_lease(30)
        assert lease > 0 and other > 0 and lease != other
        assert await s.lease_alive(lease)
        assert await s.keepalive(lease) == pytest.approx(30)
        await s.put("node/a", b"1", lease=lease)
        await s.put("node/b", b"2", lease=lease)
        await s.put("node/c", b"3", lease=other)
        assert (await s.get("node/a")).lease == lease  # type: ignore[union-attr]
        rev = await s.revision()
        await s.revoke_lease(lease)
        assert await s.revision() == rev + 1  # both keys go in one revision
        assert not await s.lease_alive(lease)
        assert [kv.key for kv in await s.range("node/")] == ["node/c"]
        await s.revoke_lease(lease)  # already gone: fine
        await s.revoke_lease(987654)  # never existed: fine
        with pytest.raises(errors.LeaseExpired):
            await s.keepalive(lease)
        with pytest.raises(errors.LeaseExpired):
            await s.put("node/a", b"1", lease=lease)
        assert await s.revision() == rev + 1
        empty = await s.grant_lease(30)
        await s.revoke_lease(empty)  # no keys: no revision
        assert await s.revision() == rev + 1

    run(make_store, body)


def test_put_without_lease_detaches_key(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        lease = await s.grant_lease(30)
        await s.put("k", b"1", lease=lease)
        await s.put("k", b"2")
        assert (await s.get("k")).lease == 0  # type: ignore[union-attr]
        await s.revoke_lease(lease)
        assert (await s.get("k")).value == b"2"  # type: ignore[union-attr]

    run(make_store, body)


def test_lease_expiry_deletes_keys(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        start = time.time()
        lease = await s.grant_lease(0.3)
        await s.put("n/1", b"x", lease=lease)
        await s.put("n/2", b"y", lease=lease)
        await s.put("keep", b"z")
        w = s.watch("n/")
        assert await s.lease_alive(lease)
        await eventually(lambda: _is_none(s.get("n/1")))
        assert time.time() - start >= 0.29
        assert await s.get("n/2") is None
        assert not await s.lease_alive(lease)
        assert await s.get("keep") is not None
        events = await take(w, 2)
        assert summary(events) == [("delete", "n/1", b"", 4), ("delete", "n/2", b"", 4)]
        with pytest.raises(errors.LeaseExpired):
            await s.keepalive(lease)
        with pytest.raises(errors.LeaseExpired):
            await s.put("n/1", b"x", lease=lease)

    run(make_store, body)


def test_expired_lease_never_read(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        lease = await s.grant_lease(0.4)
        deadline = time.time() + 0.4  # not before the lease's own deadline
        await s.put("k", b"v", lease=lease)
        assert (await s.get("k")) is not None
        # just past the deadline, before any watch or timer: the very next read must not see it
        await asyncio.sleep(max(0.0, deadline - time.time()) + 0.02)
        assert await s.get("k") is None
        assert await s.range("") == []

    run(make_store, body)


def test_keepalive_extends_lease(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        lease = await s.grant_lease(1.0)  # roomy: a loaded CI machine stalls for 0.5 s
        await s.put("k", b"v", lease=lease)
        for _ in range(6):  # 1.5 s in all, longer than the TTL
            await asyncio.sleep(0.25)
            assert await s.keepalive(lease) == pytest.approx(1.0)
        assert await s.lease_alive(lease)
        assert await s.get("k") is not None

    run(make_store, body)


def test_lease_past_its_deadline_is_never_revived(make_store: Factory) -> None:
    """A keepalive or a put that comes after the TTL ran out fails, even when nothing has
    looked at the store in between (a node that was frozen must learn it lost its lease)."""

    async def body(s: MetadataStore) -> None:
        lease = await s.grant_lease(0.3)
        await s.put("k", b"v", lease=lease)
        await asyncio.sleep(0.75)
        with pytest.raises(errors.LeaseExpired):
            await s.keepalive(lease)
        with pytest.raises(errors.LeaseExpired):
            await s.put("k2", b"v", lease=lease)
        assert await s.get("k") is None

    run(make_store, body)


async def _is_none(aw: Awaitable[KeyValue | None]) -> bool:
    return await aw is None


# --- watch -----------------------------------------------------------------------------


def test_watch_from_now_sees_puts_and_deletes_in_order(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        await s.put("a/old", b"0")
        w = s.watch("a/")
        await s.put("a/1", b"1")
        await s.put("b/1", b"x")  # other prefix: not seen
        await s.put("a/1", b"2")
        await s.delete("a/1")
        await s.delete("a/", prefix=True)
        events = await take(w, 4)
        assert summary(events) == [
            ("put", "a/1", b"1", 2),
            ("put", "a/1", b"2", 4),
            ("delete", "a/1", b"", 5),
            ("delete", "a/old", b"", 6),
        ]
        assert events[1].kv == KeyValue("a/1", b"2", 2, 4, 2, 0)
        assert events[2].kv == KeyValue("a/1", b"", 0, 5, 0, 0)

    run(make_store, body)


def test_watch_replays_from_start_revision(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        for i in range(1, 6):
            await s.put(f"k/{i}", str(i).encode())
        await s.delete("k/1")  # revision 6
        w = s.watch("k/", start_revision=3)
        events = await take(w, 3)
        assert summary(events) == [
            ("put", "k/4", b"4", 4),
            ("put", "k/5", b"5", 5),
            ("delete", "k/1", b"", 6),
        ]
        await s.put("k/7", b"7")  # then live events follow
        assert summary(await take(w, 1)) == [("put", "k/7", b"7", 7)]
        everything = s.watch("", start_revision=1)  # changes after revision 1
        assert [e.kv.mod_revision for e in await take(everything, 6)] == [2, 3, 4, 5, 6, 7]

    run(make_store, body)


def test_watch_future_start_revision_waits(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        w = s.watch("", start_revision=2)
        for i in range(1, 5):
            await s.put("k", str(i).encode())
        assert [e.kv.value for e in await take(w, 2)] == [b"3", b"4"]

    run(make_store, body)


def test_watch_many_events_and_concurrent_watchers(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        w1, w2 = s.watch("x/"), s.watch("x/")

        async def writer() -> None:
            for i in range(50):
                await s.put(f"x/{i % 7}", str(i).encode())

        results = await asyncio.gather(take(w1, 50), take(w2, 50), writer())
        for events in results[:2]:
            assert [e.kv.value for e in events] == [str(i).encode() for i in range(50)]
            revisions = [e.kv.mod_revision for e in events]
            assert revisions == sorted(revisions) and len(set(revisions)) == 50

    run(make_store, body)


def test_close_ends_watch(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        w = s.watch("")

        async def consume() -> list[WatchEvent]:
            return [e async for e in w]

        task = asyncio.create_task(consume())
        await s.put("a", b"1")
        await asyncio.sleep(0.2)
        await s.close()
        events = await asyncio.wait_for(task, 3)
        assert summary(events) == [("put", "a", b"1", 1)]

    run(make_store, body)


def test_watch_of_pruned_history_fails(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        for i in range(10):
            await s.put("k", str(i).encode())
        kept = s.watch("", start_revision=5)  # revisions 6..10 retained
        assert [e.kv.mod_revision for e in await take(kept, 5)] == [6, 7, 8, 9, 10]
        with pytest.raises(errors.InvalidArgument):
            await anext(s.watch("", start_revision=4))

    run(make_store, body, event_history=5)


# --- open_store ------------------------------------------------------------------------


def test_open_store(tmp_path: Path) -> None:
    async def body() -> None:
        async with open_store("memory://") as m:
            assert isinstance(m, MemoryStore) and m.url == "memory://"
        url = f"sqlite://{tmp_path}/m.db"
        async with open_store(url) as s:
            assert isinstance(s, SqliteStore) and s.url == url
            await s.put("a", b"1")
        assert (tmp_path / "m.db").exists()

    asyncio.run(body())
    for bad in ["", "memory:", "sqlite://relative.db", "sqlite:///", "etcd://", "etcd://h", "x"]:
        with pytest.raises(errors.InvalidArgument):
            open_store(bad)


def test_sqlite_unreachable_file_is_unavailable(tmp_path: Path) -> None:
    async def body(s: MetadataStore) -> None:
        with pytest.raises(errors.MetadataUnavailable):
            await s.get("a")

    run(lambda: SqliteStore(tmp_path / "missing-dir" / "m.db"), body)


# --- several SqliteStore instances on one file -----------------------------------------


def test_sqlite_instances_share_state(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"

    async def body(a: MetadataStore, b: MetadataStore) -> None:
        assert await a.put("other", b"") == 1
        # A watch's "now" (start_revision 0) is ordered only against calls on the same store,
        # so watch from a known revision. (0 would mean "now", not "after revision 0".)
        w = b.watch("k/", start_revision=await b.revision())
        assert await a.put("k/1", b"a") == 2
        assert await b.put("k/2", b"b") == 3
        assert await b.get("k/1") == KeyValue("k/1", b"a", 2, 2, 1, 0)
        assert [kv.key for kv in await a.range("k/")] == ["k/1", "k/2"]
        assert await a.revision() == await b.revision() == 3
        assert summary(await take(w, 2)) == [("put", "k/1", b"a", 2), ("put", "k/2", b"b", 3)]
        # a lease granted by one is visible to and expires for the other
        lease = await a.grant_lease(0.3)
        assert await b.lease_alive(lease)
        await b.put("k/3", b"c", lease=lease)
        await eventually(lambda: _is_none(a.get("k/3")))
        assert summary(await take(w, 2)) == [("put", "k/3", b"c", 4), ("delete", "k/3", b"", 5)]

    run_many(lambda: SqliteStore(path), lambda: SqliteStore(path), body=body)


def test_sqlite_cas_race_has_one_winner(tmp_path: Path) -> None:
    path = tmp_path / "race.db"

    async def body(a: MetadataStore, b: MetadataStore) -> None:
        await a.put("owner", b"none")
        for round_ in range(20):
            kv = await a.get("owner")
            assert kv is not None
            cond = [Compare.revision("owner", kv.mod_revision)]
            ra, rb = await asyncio.gather(
                a.txn(cond, [Put("owner", f"a{round_}".encode())]),
                b.txn(cond, [Put("owner", f"b{round_}".encode())]),
            )
            assert ra.succeeded != rb.succeeded
            winner = "a" if ra.succeeded else "b"
            assert (await b.get("owner")).value == f"{winner}{round_}".encode()  # type: ignore[union-attr]

    run_many(lambda: SqliteStore(path), lambda: SqliteStore(path), body=body)


def test_sqlite_concurrent_increments_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "counter.db"

    async def increment(s: MetadataStore, times: int) -> None:
        for _ in range(times):
            while True:
                kv = await s.get("n")
                cond = [Compare.revision("n", kv.mod_revision if kv else 0)]
                value = str(int(kv.value) + 1 if kv else 1).encode()
                if (await s.txn(cond, [Put("n", value)])).succeeded:
                    break

    async def body(a: MetadataStore, b: MetadataStore, c: MetadataStore) -> None:
        await asyncio.gather(increment(a, 25), increment(b, 25), increment(c, 25))
        kv = await a.get("n")
        assert kv is not None and kv.value == b"75" and kv.version == 75

    run_many(*[lambda: SqliteStore(path)] * 3, body=body)


def test_sqlite_lock_held_too_long_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"

    async def body(s: MetadataStore) -> None:
        await s.put("a", b"1")
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(errors.MetadataUnavailable):
                await s.put("a", b"2")
            assert (await s.get("a")).value == b"1"  # type: ignore[union-attr]
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert await s.put("a", b"2") == 2

    run(lambda: SqliteStore(path, busy_timeout=0.2), body)


def test_sqlite_store_persists(tmp_path: Path) -> None:
    path = tmp_path / "persist.db"

    async def first(s: MetadataStore) -> None:
        await s.put("a", b"1")
        await s.put("a", b"2")

    async def second(s: MetadataStore) -> None:
        assert await s.revision() == 2
        assert await s.get("a") == KeyValue("a", b"2", 1, 2, 2, 0)
        assert summary(await take(s.watch("", start_revision=1), 1)) == [("put", "a", b"2", 2)]

    run(lambda: SqliteStore(path), first)
    run(lambda: SqliteStore(path), second)
