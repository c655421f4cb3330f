"""etcd v3 implementation of the metadata store (see cargohold.stores.metadata).

Talks gRPC to etcd (3.4+) through aetcd's generated v3 bindings on ``grpc.aio``; the client
logic (endpoints, timeouts, retries, watches) is ours. How the interface maps onto etcd:

- Keys live under ``key_prefix`` (default ``/cargohold/``) so that a cluster can be shared;
  callers never see the prefix.
- Revisions are etcd's, minus one: etcd counts an empty cluster as revision 1, the store
  interface as 0. ``mod_revision``/``create_revision`` of keys and events, compares,
  ``TxnResult.revision`` and watch start revisions are all shifted the same way, so etcd's
  revision N is the store's N-1. On a shared cluster, other users' writes advance it too.
- Leases are etcd leases. etcd counts TTLs in whole seconds and raises them to its minimum
  (ceil(1.5 x election timeout): 2 s with etcd's defaults), so ``grant_lease(0.3)`` asks
  for 1 s and ``keepalive`` returns the TTL etcd granted. A lease expires when etcd's leader
  revokes it, which it checks about every 500 ms; until then its keys are still read.
- Watches replay from etcd's history. ``event_history`` makes the store compact etcd so that
  only the newest revisions are kept, like the other stores (Kubernetes' apiserver compacts
  its etcd the same way); ``None`` leaves compaction to the cluster's own settings.
- Security: with ``tls`` (the host's TLS files: cluster CA, certificate and key) every
  channel is TLS, checking the member's certificate against the CA and the address dialled,
  and showing the host's certificate (etcd's ``--client-cert-auth``); without, plaintext.
  With ``user`` (and ``password``) the store signs in to each member (etcd's auth) and
  sends its token with every request, signing in again when etcd says it expired; the user
  needs read and write on ``key_prefix`` (and root to compact, else compaction is skipped).
- Availability: members on this host are tried first. Each request gets
  ``request_timeout`` (1 s) on one endpoint, then the next endpoint is tried, with backoff
  after each full round, until ``timeout`` (5 s) has passed: then ``MetadataUnavailable``.
  Requests carry etcd's ``hasleader`` flag, so a member
  without a leader (during an election, or cut from its quorum) refuses at once instead of
  waiting. Reads, lease calls and compaction are retried on any transient error. A write
  (put, delete, txn) is retried only when etcd did not take it (no leader, connection
  refused, ...): when the outcome is unknown (a timeout, a connection lost mid-request), it
  fails with ``MetadataUnavailable`` saying so, as etcd's own client does, because running
  it twice could apply it twice. Such a write may still take effect; guard writes that must
  not repeat with compares, and read before retrying them.
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from cargohold import errors
from cargohold.config import ETCD_REQUEST_TIMEOUT, TlsFiles
from cargohold.core.retry import Backoff
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

DEFAULT_KEY_PREFIX = "/cargohold/"
_OFFSET = 1  # etcd revision = store revision + _OFFSET
_METADATA = (("hasleader", "true"),)  # refuse at once on a member that has no leader
_CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),  # a restarted member is used again soon
    ("grpc.keepalive_time_ms", 10_000),  # etcd's default enforcement minimum is 5 s
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.max_receive_message_length", 256 << 20),
]
#: A watch whose stream failed or ended opens again on the next member after this backoff.
WATCH_AGAIN = Backoff(first=0.05, most=0.5)
# Errors after which etcd certainly did not apply the request: safe to send a write again.
_NOT_TAKEN = (
    "no leader",
    "not capable",
    "unhealthy cluster",
    "too many requests",
    "proposal dropped",
    "leader changed",
    "failed to connect",
    "connection refused",
)
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


def parse_endpoint(endpoint: str) -> str:
    """``host:port`` (or ``http://host:port``, ``[v6addr]:port``) → ``host:port``."""
    text = endpoint.strip() if isinstance(endpoint, str) else ""
    if text.startswith("http://"):
        text = text[len("http://") :]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or "/" in text or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.InvalidArgument(
            what="etcd endpoint",
            detail=f"{endpoint!r} is not host:port",
        )
    return f"{host}:{int(port)}"


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end);
    b"\\0" (all keys) for the empty prefix."""
    if not prefix:
        return b"\0"
    # UTF-8 never contains 0xff, so incrementing the last byte gives the exclusive end
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _etcd_rev(revision: int) -> int:
    return revision + _OFFSET if revision > 0 else 0


def _store_rev(revision: int) -> int:
    return revision - _OFFSET if revision > 0 else 0


def _not_taken(e: grpc.aio.AioRpcError) -> bool:
    details = (e.details() or "").lower()
    return any(text in details for text in _NOT_TAKEN)


def _local(address: str) -> bool:
    """Whether the member at ``address`` runs on this host: its address is one of ours (a
    node talks to its own member first, so that a cut between other hosts does not stall
    it). Loopback counts as local."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, 0, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))  # only an address of this host can be bound
                return True
            except OSError:
                continue
    return False


class _Endpoint:
    """One etcd member: its channel and stubs, opened on first use."""

    def __init__(self, address: str, tls: grpc.ChannelCredentials | None) -> None:
        self.address = address
        self.tls = tls
        self.channel: grpc.aio.Channel | None = None
        self.kv: Any = None
        self.lease: Any = None
        self.watch: Any = None
        self.auth: Any = None
        self.metadata: tuple[tuple[str, str], ...] = _METADATA  # + the auth token, once given

    def signed_in(self, token: str | None) -> None:
        self.metadata = _METADATA + ((("token", token),) if token else ())

    def open(self) -> _Endpoint:
        if self.channel is None:
            self.channel = (
                grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
                if self.tls is None else
                grpc.aio.secure_channel(self.address, self.tls, options=_CHANNEL_OPTIONS))
            self.kv = rpc.KVStub(self.channel)
            self.lease = rpc.LeaseStub(self.channel)
            self.watch = rpc.WatchStub(self.channel)
            self.auth = rpc.AuthStub(self.channel)
        return self

    async def close(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()


class EtcdStore(MetadataStore):
    """Metadata store in the etcd cluster reachable at ``endpoints`` (``host:port`` each).

    ``key_prefix``: where the store's keys live in etcd. ``request_timeout``: seconds for one
    request on one endpoint. ``timeout``: seconds after which an operation that no endpoint
    could serve fails with MetadataUnavailable (a watch that cannot reconnect too).
    ``event_history``: revisions to keep for watches (the store compacts etcd), or None to
    leave compaction to etcd's ``--auto-compaction-*``.

    Opens its gRPC channels on first use; use it from one event loop.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        request_timeout: float = ETCD_REQUEST_TIMEOUT,
        timeout: float = 5.0,
        event_history: int | None = EVENT_HISTORY,
        tls: TlsFiles | None = None,
        user: str = "",
        password: str = "",
    ) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise errors.InvalidArgument(
                what="etcd endpoints", detail=f"{endpoints!r} is not a non-empty list"
            )
        addresses = sorted((parse_endpoint(e) for e in endpoints), key=lambda a: not _local(a))
        check_prefix(key_prefix, "etcd key prefix")
        for name, value in (("request_timeout", request_timeout), ("timeout", timeout)):
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise errors.InvalidArgument(what=name, detail=f"{value!r} is not a number > 0")
        self.url = (("etcds://" if tls is not None else "etcd://") + (f"{user}@" if user else "")
                    + ",".join(addresses))
        self._user, self._password = user, password
        credentials = None
        if tls is not None:
            try:
                credentials = grpc.ssl_channel_credentials(
                    tls.ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes())
            except OSError as e:
                raise errors.InvalidArgument(what="etcd TLS files", detail=str(e)) from None
        self.key_prefix = key_prefix
        self._prefix = key_prefix.encode("utf-8")
        self._request_timeout = float(request_timeout)
        self._timeout = float(timeout)
        self._history = None if event_history is None else max(1, event_history)
        self._compacted = 0  # store revision up to which this store last compacted
        self._endpoints = [_Endpoint(a, credentials) for a in addresses]
        self._current = 0  # the endpoint that answered last
        self._closed = False
        self._barrier: asyncio.Future[int] | None = None  # a watch's "now" being read
        self._calls: set[Any] = set()  # open watch streams
        self._tasks: set[asyncio.Future[Any]] = set()

    # -- keys and values

    def _key(self, key: str) -> bytes:
        return self._prefix + key.encode("utf-8")

    def _range_of(self, prefix: str) -> tuple[bytes, bytes]:
        start = self._key(prefix)
        return (start or b"\0"), _prefix_end(start)

    def _kv(self, kv: Any) -> KeyValue:
        return KeyValue(
            bytes(kv.key[len(self._prefix) :]).decode("utf-8"),
            bytes(kv.value),
            _store_rev(kv.create_revision),
            _store_rev(kv.mod_revision),
            kv.version,
            kv.lease,
        )

    def _event(self, event: Any) -> WatchEvent:
        if event.type == rpc.Event.EventType.DELETE:
            return WatchEvent("delete", self._kv(event.kv))
        return WatchEvent("put", self._kv(event.kv))

    # -- requests

    def _closed_error(self) -> errors.MetadataUnavailable:
        return errors.MetadataUnavailable(url=self.url, detail="the store is closed")

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _error(self, e: grpc.aio.AioRpcError, leases: Sequence[int] = ()) -> errors.CargoholdError:
        """The cargohold error for an etcd error that retrying cannot fix."""
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
            return errors.LeaseExpired(lease=", ".join(str(lid) for lid in leases) or "?")
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            return errors.InvalidArgument(what="etcd request", detail=details)
        return errors.MetadataUnavailable(url=self.url, detail=f"{code.name}: {details}")

    async def _wait_barrier(self) -> None:
        """Let a watch's "now" be read before any later request of this store is sent."""
        barrier = self._barrier
        if barrier is not None and not barrier.done():
            await asyncio.wait({barrier})

    async def _request(
        self,
        what: str,
        send: Callable[[_Endpoint, float], Awaitable[T]],
        *,
        write: bool = False,
        timeout: float | None = None,
        barrier: bool = True,
    ) -> T:
        """``send(endpoint, seconds)`` on the current endpoint, failing over to the others
        with backoff until ``timeout``. Errors that retrying cannot fix propagate as
        AioRpcError (see _error); a ``write`` whose outcome is unknown is not resent."""
        self._check_open()
        if barrier:
            await self._wait_barrier()
            self._check_open()
        limit = self._timeout if timeout is None else timeout
        attempts = Backoff(first=0.05, most=0.5, timeout=limit).start()
        failures = 0
        last = ""
        while True:
            endpoint = self._endpoints[self._current].open()
            remaining = attempts.remaining()
            seconds = max(0.001, min(self._request_timeout, remaining))
            try:
                if self._user and len(endpoint.metadata) == len(_METADATA):
                    await self._sign_in(endpoint, seconds)
                return await send(endpoint, seconds)
            except grpc.aio.AioRpcError as e:
                if self._closed:
                    raise self._closed_error() from e
                if e.code() == grpc.StatusCode.UNAUTHENTICATED and self._user:
                    endpoint.signed_in(None)  # the token expired: sign in again, then retry
                elif e.code() not in _TRANSIENT:
                    raise
                last = f"{endpoint.address}: {e.code().name} {e.details()}"
                self._current = (self._current + 1) % len(self._endpoints)
                if write and not _not_taken(e):
                    raise errors.MetadataUnavailable(
                        url=self.url,
                        detail=f"{what} got no answer ({last}); it may or may not have "
                        "been applied: read the current state before trying again",
                    ) from e
            failures += 1
            if failures % len(self._endpoints) == 0:  # every endpoint failed once more
                pause = attempts.next_pause()
                if pause:
                    await asyncio.sleep(pause)
            if attempts.remaining() <= 0:
                raise errors.MetadataUnavailable(
                    url=self.url,
                    detail=f"no etcd endpoint could {what} within {limit:g}s (last error: {last})",
                )
            self._check_open()

    async def _sign_in(self, endpoint: _Endpoint, seconds: float) -> None:
        """Exchange the user and password for the member's auth token (etcd's simple or JWT
        tokens expire: an UNAUTHENTICATED answer makes the next attempt sign in again)."""
        try:
            answer = await endpoint.auth.Authenticate(
                rpc.AuthenticateRequest(name=self._user, password=self._password),
                timeout=seconds, metadata=_METADATA)
        except grpc.aio.AioRpcError as e:
            if e.code() in _TRANSIENT:
                raise
            raise errors.InvalidArgument(what="etcd user", detail=f"{self._user!r} cannot sign "
                                         f"in: {e.details() or e.code().name}") from None
        endpoint.signed_in(answer.token)

    async def _unary(self, what: str, method: str, stub: str, request: Any, **kw: Any) -> Any:
        async def send(endpoint: _Endpoint, seconds: float) -> Any:
            call = getattr(getattr(endpoint, stub), method)
            return await call(request, timeout=seconds, metadata=endpoint.metadata)

        return await self._request(what, send, **kw)

    async def _header_revision(self, *, barrier: bool = True) -> int:
        resp = await self._unary(
            "read the revision",
            "Range",
            "kv",
            rpc.RangeRequest(key=self._prefix or b"\0", count_only=True),
            barrier=barrier,
        )
        return _store_rev(resp.header.revision)

    async def _after_write(self, revision: int) -> None:
        """Compact etcd's history down to ``event_history`` revisions, now and then.

        Best effort, one attempt: a failure only delays compaction to a later write.
        """
        if self._history is None or revision - self._compacted <= self._history + (
            self._history // 8
        ):
            return
        target = revision - self._history  # store revisions <= target are dropped
        request = rpc.CompactionRequest(revision=target + 1 + _OFFSET)
        try:
            await self._unary("compact", "Compact", "kv", request, timeout=self._request_timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.OUT_OF_RANGE:  # not "already compacted"
                return
        except errors.MetadataUnavailable:
            return
        self._compacted = max(self._compacted, target)

    # -- interface

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        try:
            resp = await self._unary("read", "Range", "kv", rpc.RangeRequest(key=self._key(key)))
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e
        return self._kv(resp.kvs[0]) if resp.kvs else None

    async def range(self, prefix: str) -> list[KeyValue]:
        check_prefix(prefix)
        start, end = self._range_of(prefix)
        try:
            resp = await self._unary(
                "read", "Range", "kv", rpc.RangeRequest(key=start, range_end=end)
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e
        return [self._kv(kv) for kv in resp.kvs]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        op = Put(key, value, lease)
        request = rpc.PutRequest(key=self._key(op.key), value=op.value, lease=op.lease)
        try:
            resp = await self._unary("write", "Put", "kv", request, write=True)
        except grpc.aio.AioRpcError as e:
            raise self._error(e, [lease]) from e
        revision = _store_rev(resp.header.revision)
        await self._after_write(revision)
        return revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        op = Delete(key, prefix)
        start, end = self._range_of(op.key) if prefix else (self._key(op.key), b"")
        request = rpc.DeleteRangeRequest(key=start, range_end=end)
        try:
            resp = await self._unary("delete", "DeleteRange", "kv", request, write=True)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e
        if resp.deleted:
            await self._after_write(_store_rev(resp.header.revision))
        return int(resp.deleted)

    def _compare(self, compare: Compare) -> list[Any]:
        key = self._key(compare.key)
        out = []
        if compare.mod_revision is not None:
            out.append(
                rpc.Compare(
                    key=key,
                    result=rpc.Compare.CompareResult.EQUAL,
                    target=rpc.Compare.CompareTarget.MOD,
                    mod_revision=_etcd_rev(compare.mod_revision),
                )
            )
        if compare.value is not None:  # etcd fails a value compare on a missing key
            out.append(
                rpc.Compare(
                    key=key,
                    result=rpc.Compare.CompareResult.EQUAL,
                    target=rpc.Compare.CompareTarget.VALUE,
                    value=compare.value,
                )
            )
        return out

    def _op(self, op: Op) -> Any:
        if isinstance(op, Put):
            put = rpc.PutRequest(key=self._key(op.key), value=op.value, lease=op.lease)
            return rpc.RequestOp(request_put=put)
        start, end = self._range_of(op.key) if op.prefix else (self._key(op.key), b"")
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=start, range_end=end))

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        check_txn(compares, success, failure)
        request = rpc.TxnRequest(
            compare=[c for compare in compares for c in self._compare(compare)],
            success=[self._op(op) for op in success],
            failure=[self._op(op) for op in failure],
        )
        try:
            resp = await self._unary("run a transaction", "Txn", "kv", request, write=True)
        except grpc.aio.AioRpcError as e:
            leases = sorted({op.lease for op in [*success, *failure] if isinstance(op, Put)} - {0})
            raise self._error(e, leases) from e
        revision = _store_rev(resp.header.revision)
        await self._after_write(revision)
        return TxnResult(bool(resp.succeeded), revision)

    async def revision(self) -> int:
        try:
            return await self._header_revision()
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e

    async def grant_lease(self, ttl: float) -> int:
        check_ttl(ttl)
        # etcd's TTL is whole seconds (and at least its minimum). A grant resent after a
        # lost answer may leave an unused lease behind: it has no keys and expires.
        request = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        try:
            resp = await self._unary("grant a lease", "LeaseGrant", "lease", request)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e
        if resp.error:
            raise errors.MetadataUnavailable(url=self.url, detail=resp.error)
        return int(resp.ID)

    async def keepalive(self, lease: int) -> float:
        async def send(endpoint: _Endpoint, seconds: float) -> Any:
            call = endpoint.lease.LeaseKeepAlive(timeout=seconds, metadata=endpoint.metadata)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
                await call.done_writing()
                resp = await call.read()
            finally:
                if not call.done():
                    call.cancel()
            if resp is grpc.aio.EOF:  # the stream ended without an answer: try again
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "keepalive stream closed",
                )
            return resp

        try:
            resp = await self._request("keep a lease alive", send)
        except grpc.aio.AioRpcError as e:
            raise self._error(e, [lease]) from e
        if resp.TTL <= 0:
            raise errors.LeaseExpired(lease=lease)
        return float(resp.TTL)

    async def revoke_lease(self, lease: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease)
        try:
            await self._unary("revoke a lease", "LeaseRevoke", "lease", request)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # unknown or already gone: fine
                return
            raise self._error(e) from e

    async def lease_alive(self, lease: int) -> bool:
        request = rpc.LeaseTimeToLiveRequest(ID=lease)
        try:
            resp = await self._unary("read a lease", "LeaseTimeToLive", "lease", request)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e
        return int(resp.TTL) >= 0  # -1: not found (expired, revoked or never granted)

    # -- watch

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        check_prefix(prefix)
        check_revision(start_revision, "watch start revision")
        self._check_open()
        now: asyncio.Future[int] | None = None
        if start_revision == 0:
            # "Now" is read before any request this store sends after this call.
            now = asyncio.ensure_future(self._header_revision(barrier=False))
            now.add_done_callback(_consume)
            self._tasks.add(now)
            now.add_done_callback(self._tasks.discard)
            self._barrier = now
        return self._watch(prefix, start_revision, now)

    async def _watch(
        self, prefix: str, last: int, now: asyncio.Future[int] | None
    ) -> AsyncIterator[WatchEvent]:
        if now is not None:
            try:
                last = await now
            except grpc.aio.AioRpcError as e:
                raise self._error(e) from e
            except (errors.MetadataUnavailable, asyncio.CancelledError):
                if self._closed and not _cancelling():
                    return  # close() cancelled the read of "now"
                raise
        start, end = self._range_of(prefix)
        attempts = WATCH_AGAIN.start()
        while not self._closed:
            call = await self._open_watch(start, end, last)
            if call is None:  # closed meanwhile
                return
            try:
                while True:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        break  # the member ended the stream: watch again elsewhere
                    if resp.compact_revision:
                        raise compacted(last, _store_rev(resp.compact_revision - 1))
                    if resp.canceled:
                        raise errors.MetadataUnavailable(
                            url=self.url, detail=f"etcd ended a watch: {resp.cancel_reason}"
                        )
                    attempts = WATCH_AGAIN.start()  # it works again: the next pause is short
                    for event in resp.events:
                        yield self._event(event)
                        if self._closed:
                            return
                    if resp.events:  # a response carries whole revisions
                        last = _store_rev(resp.events[-1].kv.mod_revision)
                    elif not resp.created:  # progress: nothing more up to this revision
                        last = max(last, _store_rev(resp.header.revision))
            except grpc.aio.AioRpcError as e:
                if self._closed:
                    return
                if e.code() not in _TRANSIENT:
                    raise self._error(e) from e
            except asyncio.CancelledError:
                if self._closed and not _cancelling():
                    return  # close() cancelled the stream
                raise
            finally:
                self._calls.discard(call)
                if not call.done():
                    call.cancel()
            # the stream failed or ended: watch again from ``last``, next endpoint first
            self._current = (self._current + 1) % len(self._endpoints)
            await asyncio.sleep(attempts.next_pause() or 0.0)

    async def _open_watch(self, start: bytes, end: bytes, last: int) -> Any:
        """A watch stream on some endpoint sending the changes after store revision
        ``last``; None if the store was closed. Raises InvalidArgument if they are no longer
        retained, MetadataUnavailable if no endpoint accepts the watch within ``timeout``."""
        create = rpc.WatchCreateRequest(
            key=start, range_end=end, start_revision=last + 1 + _OFFSET, progress_notify=True
        )

        async def created(call: Any) -> Any:
            await call.write(rpc.WatchRequest(create_request=create))
            return await call.read()

        async def send(endpoint: _Endpoint, seconds: float) -> Any:
            call = endpoint.watch.Watch(metadata=endpoint.metadata)
            self._calls.add(call)
            try:
                resp = await asyncio.wait_for(created(call), seconds)
            except TimeoutError as e:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "watch not created in time",
                ) from e
            except BaseException:
                self._calls.discard(call)
                call.cancel()
                raise
            if resp is grpc.aio.EOF or not resp.created:
                self._calls.discard(call)
                call.cancel()
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "watch stream ended before the watch was created",
                )
            if resp.compact_revision:
                self._calls.discard(call)
                call.cancel()
                raise compacted(last, _store_rev(resp.compact_revision - 1))
            return call

        try:
            return await self._request("watch", send, barrier=False)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e
        except (errors.MetadataUnavailable, asyncio.CancelledError):
            if self._closed and not _cancelling():
                return None
            raise

    # -- closing

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for call in list(self._calls):
            call.cancel()
        self._calls.clear()
        for task in list(self._tasks):
            task.cancel()
        for endpoint in self._endpoints:
            await endpoint.close()


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a background future's outcome so that asyncio does not log it."""
    if not future.cancelled():
        future.exception()


def _cancelling() -> bool:
    """Whether the current task is being cancelled (rather than a stream it reads)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
