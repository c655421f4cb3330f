"""The etcd metadata store against real etcd processes on 127.0.0.1.

1. The metadata store contract suite (tests/unit/test_metadata_contract.py), each test on a
   fresh one-member etcd. Two tests are replaced by etcd versions with the same meaning,
   because etcd counts lease TTLs in whole seconds (see cargohold.stores.etcd).
2. What only etcd shows: the key prefix, endpoint failover, a killed leader, a lost quorum.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from cargohold import errors
from cargohold.config import TlsFiles, read_secret
from cargohold.stores import pki
from cargohold.stores.etcd import EtcdStore
from cargohold.stores.metadata import (
    Compare,
    KeyValue,
    MetadataStore,
    Put,
    WatchEvent,
)
from cargohold.stores.opener import open_store
from tests.etcdcluster import (  # noqa: F401
    EtcdCluster,
    etcd1,
    etcd1_tls,
    etcd3,
    etcd_credentials,
    needs_etcd,
)
from tests.unit import test_metadata_contract as contract
from tests.unit.test_metadata_contract import Factory, eventually, run, take

pytestmark = [needs_etcd, pytest.mark.timeout(60)]


# --- the contract suite on etcd ----------------------------------------------------------

_REPLACED = {"test_expired_lease_never_read", "test_keepalive_extends_lease",
             "test_lease_past_its_deadline_is_never_revived"}  # see below


def _contract_tests() -> dict[str, Callable[..., None]]:
    """Every contract test that takes ``make_store``: collected here again, where
    ``make_store`` (below) gives etcd stores only."""
    found = {}
    for name, fn in vars(contract).items():
        if name.startswith("test_") and callable(fn) and name not in _REPLACED:
            if "make_store" in inspect.signature(fn).parameters:
                found[name] = fn
    return found


globals().update(_contract_tests())


@pytest.fixture(params=["etcd", "etcds"])
def make_store(request: pytest.FixtureRequest) -> Factory:
    """Stores on a fresh one-member etcd (so revisions start at 0, as the suite expects),
    in plaintext and over TLS with client certificates."""
    if request.param == "etcd":
        cluster: EtcdCluster = request.getfixturevalue("etcd1")
        return lambda **kw: EtcdStore(cluster.endpoints, **kw)
    cluster = request.getfixturevalue("etcd1_tls")
    files = _tls_files(request.getfixturevalue("etcd_credentials"))
    return lambda **kw: EtcdStore(cluster.endpoints, tls=files, **kw)


def _tls_files(directory: Path) -> TlsFiles:
    return TlsFiles(ca=directory / "ca.crt", cert=directory / "node.crt",
                    key=directory / "node.key")


def test_etcd_over_tls_lets_in_only_certificates_of_its_ca(
        etcd1_tls: EtcdCluster, etcd_credentials: Path, tmp_path: Path) -> None:  # noqa: F811
    pki.init_authority(tmp_path / "other")
    pki.issue(tmp_path / "other", "etcd", tmp_path / "stranger", ["127.0.0.1"])
    assert etcd1_tls.url.startswith("etcds://")

    async def body() -> None:
        store = open_store(etcd1_tls.url, _tls_files(etcd_credentials))
        try:
            await store.put("k", b"v")
            assert (await store.get("k")).value == b"v"  # type: ignore[union-attr]
        finally:
            await store.close()
        for stranger in (EtcdStore(etcd1_tls.endpoints, timeout=1.0),  # plaintext
                         EtcdStore(etcd1_tls.endpoints, timeout=1.0,
                                   tls=_tls_files(tmp_path / "stranger"))):
            try:
                with pytest.raises(errors.MetadataUnavailable):
                    await stranger.get("k")
            finally:
                await stranger.close()
        with pytest.raises(errors.InvalidArgument, match="needs this host's TLS files"):
            open_store(etcd1_tls.url)

    asyncio.run(body())


async def _not(aw: Awaitable[bool]) -> bool:
    return not await aw


def test_expired_lease_never_read(make_store: Factory) -> None:
    """etcd version of the contract test: the TTL is whole seconds and etcd's leader revokes
    an expired lease within about 0.5 s. Once the lease is gone, no read returns its keys,
    and it is never gone before its TTL."""

    async def body(s: MetadataStore) -> None:
        before = time.time()
        lease = await s.grant_lease(1)
        await s.put("k", b"v", lease=lease)
        await s.put("other", b"x")
        assert await s.get("k") is not None
        await eventually(lambda: _not(s.lease_alive(lease)), timeout=3)
        assert time.time() - before >= 0.99
        assert await s.get("k") is None
        assert [kv.key for kv in await s.range("")] == ["other"]

    run(make_store, body)


def test_keepalive_extends_lease(make_store: Factory) -> None:
    """etcd version: keepalive returns the TTL etcd granted (whole seconds)."""

    async def body(s: MetadataStore) -> None:
        lease = await s.grant_lease(1)
        await s.put("k", b"v", lease=lease)
        for _ in range(8):  # 2 s in all, longer than the TTL
            await asyncio.sleep(0.25)
            assert await s.keepalive(lease) == pytest.approx(1)
        assert await s.lease_alive(lease)
        assert await s.get("k") is not None

    run(make_store, body)


def test_lease_past_its_deadline_is_never_revived(make_store: Factory) -> None:
    """etcd version (whole-second TTL): no keepalive or put revives an expired lease."""

    async def body(s: MetadataStore) -> None:
        lease = await s.grant_lease(1)
        await s.put("k", b"v", lease=lease)
        await asyncio.sleep(2.5)
        with pytest.raises(errors.LeaseExpired):
            await s.keepalive(lease)
        with pytest.raises(errors.LeaseExpired):
            await s.put("k2", b"v", lease=lease)
        assert await s.get("k") is None

    run(make_store, body)


def test_lease_ttl_is_whole_seconds(make_store: Factory) -> None:
    async def body(s: MetadataStore) -> None:
        assert await s.keepalive(await s.grant_lease(0.3)) == 1.0  # etcd1's minimum is 1 s
        assert await s.keepalive(await s.grant_lease(1.5)) == 2.0  # rounded up, never down
        assert await s.keepalive(await s.grant_lease(30)) == 30.0

    run(make_store, body)


# --- what only etcd shows ----------------------------------------------------------------


def _dead_endpoint() -> str:
    """An address on which nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_open_store_routes_etcd_urls(etcd1: EtcdCluster) -> None:  # noqa: F811
    async def body() -> None:
        async with open_store(etcd1.url) as s:
            assert isinstance(s, EtcdStore) and s.url == etcd1.url
            assert await s.put("a", b"1") == 1
        url = f"etcd://{_dead_endpoint()},{etcd1.endpoints[0]}"
        async with open_store(url) as s:
            assert (await s.get("a")).value == b"1"  # type: ignore[union-attr]

    asyncio.run(body())
    for bad in ["etcd://", "etcd://h", "etcd://h:x", "etcd://h:1,", "etcd://h:1/p"]:
        with pytest.raises(errors.InvalidArgument):
            open_store(bad)


def test_key_prefix_is_invisible_and_separates_stores(etcd1: EtcdCluster) -> None:  # noqa: F811
    async def body() -> None:
        a = EtcdStore(etcd1.endpoints, key_prefix="/a/")
        b = EtcdStore(etcd1.endpoints, key_prefix="/b/")
        raw = EtcdStore(etcd1.endpoints, key_prefix="")
        try:
            wa = a.watch("")
            await a.put("k", b"a")
            await b.put("k", b"b")
            await a.put("k/1", b"a1")
            assert [(kv.key, kv.value) for kv in await a.range("")] == [("k", b"a"), ("k/1", b"a1")]
            assert [(kv.key, kv.value) for kv in await b.range("k")] == [("k", b"b")]
            assert [kv.key for kv in await raw.range("")] == ["/a/k", "/a/k/1", "/b/k"]
            assert await a.delete("", prefix=True) == 2
            assert [kv.key for kv in await raw.range("")] == ["/b/k"]
            events = await take(wa, 4)
            assert [(e.type, e.kv.key) for e in events] == [
                ("put", "k"),
                ("put", "k/1"),
                ("delete", "k"),
                ("delete", "k/1"),
            ]
            # the shared revision: b's write shows up as a gap in a's events
            assert [e.kv.mod_revision for e in events] == [1, 3, 4, 4]
        finally:
            for s in (a, b, raw):
                await s.close()

    asyncio.run(body())


def test_unreachable_endpoints_fail_in_bounded_time() -> None:
    async def failure(aw: Awaitable[Any]) -> float:
        start = time.monotonic()
        with pytest.raises(errors.MetadataUnavailable):
            await aw
        return time.monotonic() - start

    async def body() -> None:
        s = EtcdStore([_dead_endpoint(), _dead_endpoint()], timeout=1.5)
        try:
            ops = [s.get("a"), s.put("a", b"1"), s.grant_lease(5), anext(s.watch("", 3))]
            for took in await asyncio.gather(*(failure(op) for op in ops)):
                assert 1.4 < took < 3
        finally:
            await s.close()

    asyncio.run(body())


def _leader_first(cluster: EtcdCluster) -> tuple[int, list[str]]:
    leader = cluster.leader()
    others = [e for i, e in enumerate(cluster.endpoints) if i != leader]
    return leader, [cluster.endpoints[leader], *others]


def _gap(times: list[float], after: float) -> float:
    """The longest time without a success around ``after``."""
    before = [t for t in times if t <= after]
    later = [t for t in times if t > after]
    assert later, "no success after the failure"
    points = [before[-1] if before else after, *later]
    return max(b - a for a, b in zip(points, points[1:], strict=False))


def test_leader_killed_operations_continue(etcd3: EtcdCluster) -> None:  # noqa: F811
    # the store uses the leader's endpoint first, so that the kill hits it
    leader, endpoints = _leader_first(etcd3)

    async def body() -> None:
        s = EtcdStore(endpoints)
        try:
            for i in range(10):
                await s.put(f"before/{i}", b"%d" % i)
            before = await s.range("")
            w = s.watch("load/")
            acked: dict[str, int] = {}
            writes: list[float] = []
            reads: list[float] = []
            failed: list[str] = []
            stop = asyncio.Event()

            async def writer() -> None:
                i = 0
                while not stop.is_set():
                    try:
                        acked[f"load/{i}"] = await s.put(f"load/{i}", b"%d" % i)
                        writes.append(time.monotonic())
                    except errors.MetadataUnavailable as e:
                        failed.append(f"put: {e}")
                    i += 1
                    await asyncio.sleep(0.01)

            async def reader() -> None:
                while not stop.is_set():
                    try:
                        assert (await s.get("before/0")).value == b"0"  # type: ignore[union-attr]
                        reads.append(time.monotonic())
                    except errors.MetadataUnavailable as e:
                        failed.append(f"get: {e}")
                    await asyncio.sleep(0.01)

            tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
            await asyncio.sleep(0.5)
            killed = time.monotonic()
            etcd3.kill(leader)
            deadline = killed + 10
            while not (writes and writes[-1] > killed + 1 and reads and reads[-1] > killed + 1):
                assert time.monotonic() < deadline, f"no recovery in 10 s: {failed[-3:]}"
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks)
            write_gap, read_gap = _gap(writes, killed), _gap(reads, killed)
            print(
                f"\nleader killed: writes unavailable {write_gap:.2f}s, reads {read_gap:.2f}s; "
                f"{len(failed)} calls failed meanwhile: {failed[:3]}"
            )
            assert write_gap < 5 and read_gap < 5
            # every acknowledged write is there, and the watch saw them all in order
            # across the failover (writes that failed may or may not have been applied)
            kvs = {kv.key: kv for kv in await s.range("load/")}
            assert all(kvs[key].mod_revision == rev for key, rev in acked.items())
            seen: list[WatchEvent] = []
            while not set(acked) <= {e.kv.key for e in seen}:
                seen.append(await asyncio.wait_for(anext(w), 5))
            revisions = [e.kv.mod_revision for e in seen]
            assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
            assert await s.range("before/") == before
        finally:
            await s.close()

    asyncio.run(body())


def test_quorum_lost_then_restored(etcd3: EtcdCluster) -> None:  # noqa: F811
    leader = etcd3.leader()
    victims = [leader, (leader + 1) % 3]

    async def timed(aw: Awaitable[Any]) -> tuple[float, BaseException | None]:
        start = time.monotonic()
        try:
            await aw
        except BaseException as e:  # noqa: BLE001 - reported below
            return time.monotonic() - start, e
        return time.monotonic() - start, None

    async def body() -> None:
        s = EtcdStore(etcd3.endpoints)
        try:
            lease = await s.grant_lease(60)
            for i in range(10):
                await s.put(f"data/{i}", b"%d" % i, lease=lease if i % 2 else 0)
            before = await s.range("")
            revision = await s.revision()
            for i in victims:
                etcd3.kill(i)
            ops = {
                "get": s.get("data/0"),
                "range": s.range("data/"),
                "revision": s.revision(),
                "put": s.put("outage/put", b"x"),
                "txn": s.txn([Compare.absent("outage/txn")], [Put("outage/txn", b"x")]),
                "grant": s.grant_lease(10),
                "keepalive": s.keepalive(lease),
                "watch": anext(s.watch("data/", revision)),
            }
            results = await asyncio.gather(*(timed(op) for op in ops.values()))
            report = {name: round(t, 2) for name, (t, _) in zip(ops, results, strict=True)}
            print(f"\n2 of 3 members killed: seconds until MetadataUnavailable: {report}")
            for name, (took, error) in zip(ops, results, strict=True):
                assert isinstance(error, errors.MetadataUnavailable), (name, error)
                # A watch stream that a member accepted is ended by etcd only after three
                # election timeouts without a leader (~3-4 s); then the store's 5 s timeout
                # for watching again elsewhere runs.
                assert took < (12 if name == "watch" else 10), (name, took)

            restarted = time.monotonic()
            for i in victims:
                etcd3.restart(i)
            while True:  # a write whose outcome was unknown fails: the caller tries again
                try:
                    assert await s.put("after", b"1") > revision
                    break
                except errors.MetadataUnavailable:
                    assert time.monotonic() - restarted < 15, "quorum not back in 15 s"
            print(f"quorum restored: first write {time.monotonic() - restarted:.2f}s after restart")
            await asyncio.to_thread(etcd3.wait_healthy)
            # nothing acknowledged was lost or changed; the lease and its keys survived
            assert await s.range("data/") == before
            assert await s.lease_alive(lease)
            assert await s.keepalive(lease) == 60
            outage = await s.range("outage/")  # unknown outcome: there or not, but whole
            assert all(kv.value == b"x" for kv in outage)
        finally:
            await s.close()

    asyncio.run(body())


def test_watch_resumes_on_another_member(etcd3: EtcdCluster) -> None:  # noqa: F811
    """A watch whose member dies continues from the next revision on another member."""
    follower = (etcd3.leader() + 1) % 3
    endpoints = [etcd3.endpoints[follower]] + [
        e for i, e in enumerate(etcd3.endpoints) if i != follower
    ]

    async def body() -> None:
        s = EtcdStore(endpoints)
        try:
            w = s.watch("w/")
            await s.put("w/1", b"1")
            assert [e.kv.value for e in await take(w, 1)] == [b"1"]
            etcd3.kill(follower)
            for i in range(2, 6):
                try:
                    await s.put(f"w/{i}", b"%d" % i)
                except errors.MetadataUnavailable:  # sent to the dying member: the outcome is
                    if await s.get(f"w/{i}") is None:  # unknown, so read (as the error says)
                        await s.put(f"w/{i}", b"%d" % i)  # and try again
            events = await take(w, 4, timeout=6)
            assert [e.kv.value for e in events] == [b"2", b"3", b"4", b"5"]
            assert [e.kv.mod_revision for e in events] == [2, 3, 4, 5]
        finally:
            await s.close()

    asyncio.run(body())


def test_raw_revisions_are_offset_by_one(etcd1: EtcdCluster) -> None:  # noqa: F811
    """etcd counts an empty cluster as revision 1; the store interface as 0."""

    async def body() -> None:
        s = EtcdStore(etcd1.endpoints)
        try:
            assert await s.revision() == 0
            assert await s.put("a", b"1") == 1
            assert await s.get("a") == KeyValue("a", b"1", 1, 1, 1, 0)
        finally:
            await s.close()

    asyncio.run(body())
    key = base64.b64encode(b"/cargohold/a").decode()
    with httpx.Client() as http:  # etcd's own view, through its JSON gateway
        reply = http.post(f"{etcd1.members[0].client_url}/v3/kv/range", json={"key": key}).json()
    assert reply["header"]["revision"] == "2" and reply["kvs"][0]["mod_revision"] == "2"


async def _enable_auth(endpoint: str) -> None:
    """Users root and cargohold (read and write under /cargohold/), then etcd's auth on."""
    from aetcd import rpc

    async with grpc.aio.insecure_channel(endpoint) as channel:
        auth = rpc.AuthStub(channel)
        for user, password in (("root", "root-password-0123"), ("cargohold", "s3cret-pw-0123")):
            await auth.UserAdd(rpc.AuthUserAddRequest(name=user, password=password))
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name=user))
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=user))
        permission = rpc.Permission(permType=rpc.Permission.READWRITE, key=b"/cargohold/",
                                    range_end=b"/cargohold0")
        await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(
            name="cargohold", perm=permission))
        await auth.AuthEnable(rpc.AuthEnableRequest())


def test_etcd_with_users_takes_the_right_password_only(etcd1: EtcdCluster,  # noqa: F811
                                                       tmp_path: Path) -> None:
    password = tmp_path / "etcd-password"
    password.write_text("s3cret-pw-0123\n")
    password.chmod(0o600)

    async def body() -> None:
        await _enable_auth(etcd1.endpoints[0])
        url = f"etcd://cargohold@{etcd1.endpoints[0]}"
        store = open_store(url, password=read_secret(password, "password"))
        try:
            lease = await store.grant_lease(5)
            await store.put("k", b"v", lease=lease)
            assert (await store.get("k")).value == b"v"  # type: ignore[union-attr]
            events = store.watch("k")
            await store.put("k", b"w")
            assert [e.kv.value for e in await take(events, 1)] == [b"w"]
        finally:
            await store.close()
        for wrong in (open_store(url, password="not-the-password"),
                      EtcdStore(etcd1.endpoints, timeout=1.0)):  # no user at all
            try:
                with pytest.raises(errors.InvalidArgument):
                    await wrong.get("k")
            finally:
                await wrong.close()

    asyncio.run(body())
