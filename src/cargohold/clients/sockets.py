"""Socket settings of data protocol connections, the same on both ends (the engine's and
the node's data clients, and the data server), and unix sockets made with their final mode."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator

#: A server host that vanishes without a reset (power loss, partition) is declared lost
#: after about this long: unacknowledged requests or unanswered keepalive probes.
DEAD_PEER_SECONDS = 10
#: Unsent bytes a connection's socket may hold, either side: several 1 MiB frames.
SEND_BUFFER = 4 << 20


def detect_dead_peers(transport: asyncio.Transport | None) -> None:
    """Notice a peer host that vanished without a reset within ``DEAD_PEER_SECONDS``."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 5)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER_SECONDS * 1000)


def widen_send_buffer(transport: asyncio.BaseTransport | None) -> None:
    """Let the socket hold ``SEND_BUFFER`` unsent bytes (the kernel's default is ~208 KiB).

    With the default a 1 MiB frame leaves in five pieces, each waiting for the peer to read
    the one before: the sequential write benchmark went from ~480 to ~840 MB/s with this.
    Root may exceed ``net.core.wmem_max`` (SO_SNDBUFFORCE); others get what it allows.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    for option in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
            return
        except OSError:  # SO_SNDBUFFORCE needs CAP_NET_ADMIN
            continue


@contextlib.contextmanager
def created_with_mode(mode: int) -> Iterator[None]:
    """Files and sockets made inside have at most ``mode`` from the moment they exist.

    A unix socket takes its permissions from the process umask at ``bind``; a ``chmod``
    afterwards leaves a window in which anyone may connect. The umask is the process's:
    keep the block short (a bind, not a wait).
    """
    old = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(old)


def unix_listener(path: str, mode: int) -> socket.socket:
    """A unix stream socket bound at ``path`` with ``mode`` from the start (not listening
    yet: the server that takes it listens)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with created_with_mode(mode):
            sock.bind(path)
    except BaseException:
        sock.close()
        raise
    return sock
