"""``python -m cargohold.daemons.dataserver``: the data server process of one disk.

The node starts one per ``--data-dir`` (``DataServerConfig.argv()``, supervised by
:mod:`cargohold.daemons.supervisor`) in a session of its own, so that attached volumes keep
being served if the node crashes. It serves the disk store in its directory over TCP and,
for engines on this host, over the unix socket ``LOCAL_SOCKET`` there; it stops on SIGTERM
or SIGINT after flushing every replica. Once it listens it writes its ready file
(``{"id", "address", "pid", "tls", "guarded"}``, atomically).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from cargohold.adapters.dataserver import DataProtocolServer, Guard
from cargohold.config import DataServerConfig
from cargohold.core.wire import LOCAL_SOCKET
from cargohold.daemons.heap import collect_rarely, keep_large_buffers
from cargohold.errors import CargoholdError, InvalidArgument
from cargohold.stores.diskstore import DiskChunkStore
from cargohold.stores.pki import server_context

log = logging.getLogger(__name__)


def run(config: DataServerConfig) -> None:
    """Serve the disk store in ``config.root`` until SIGTERM or SIGINT."""
    keep_large_buffers()
    collect_rarely()
    uvloop.run(_run(config))  # ~2x less loop overhead per request


async def _run(config: DataServerConfig) -> None:
    root, ready_file = config.root, config.ready_file
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)  # never let a waiter see the previous run's file
    store = DiskChunkStore(root, config.reserve)
    try:
        server = DataProtocolServer(store, config.max_connections, config.frame_timeout,
                                    *_security(config))
        await _listen(server, config.host, config.port,
                      int(store.server_record().get("port", 0)))
        if server.port != store.server_record().get("port"):
            store.update_server_record(port=server.port)
        await server.listen_unix(root / LOCAL_SOCKET)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready_file is not None:
            _write_ready(ready_file, {"id": store.server_id, "address": server.address,
                                      "pid": os.getpid(), "tls": server.tls is not None,
                                      "guarded": server.guard is not None})
        await stop.wait()
        log.info("stopping data server %s", store.server_id)
        await server.close()
        for replica in store.open_replicas():
            try:
                replica.flush()
            except Exception:
                log.exception("flushing replica %s at shutdown failed", replica.volume_id)
    finally:
        store.close()
    log.info("data server %s stopped", store.server_id)


def _security(config: DataServerConfig) -> tuple[ssl.SSLContext | None, Guard | None]:
    """TLS for TCP and the capability check, as configured; loud when either is off."""
    tls = guard = None
    if config.tls is not None:
        tls = server_context(config.tls.ca, config.tls.cert, config.tls.key)
    else:
        log.warning("INSECURE: TCP without TLS (--insecure-plaintext): anyone who reaches "
                    "%s:%d can use this data server", config.host, config.port)
    if config.cluster_key is not None:
        try:
            key = bytes.fromhex(config.cluster_key.read_text().strip())
        except (OSError, ValueError) as e:
            raise InvalidArgument(what="--cluster-key", detail=f"{config.cluster_key}: {e}") \
                from None
        guard = Guard(key=key, node=config.node)
    else:
        log.warning("INSECURE: no --cluster-key: I/O at any epoch from anyone connected")
    return tls, guard


async def _listen(server: DataProtocolServer, host: str, port: int, previous: int) -> None:
    """Listen on ``port``; port 0 takes the previous run's port again when it is free."""
    if port or not previous:
        await server.start(host, port)
        return
    try:
        await server.start(host, previous)
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
            raise
        log.warning("port %d of the previous run is taken; picking a new one", previous)
        await server.start(host, 0)


def _write_ready(path: Path, info: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = DataServerConfig.from_argv(argv)
    except CargoholdError as e:
        print(f"cargohold-dataserver: {e.message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(config)
    except CargoholdError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
