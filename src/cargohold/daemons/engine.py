"""``python -m cargohold.daemons.engine``: the engine process of one attached volume.

The agent starts it (``EngineConfig.argv()``) in a session of its own, so that the volume
keeps being served if the node crashes. It serves until SIGTERM/SIGINT or until the kernel
unmounts its FUSE file system; ``RESIZE_SIGNAL`` makes it take the volume's new size. Once it
serves it writes its ready file (``{"pid", "mountpoint"}``, atomically), which the agent
waits for. Exit status: 0 after a clean stop, 2 when it could not serve (fenced, no replica,
bad arguments).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from cargohold.clients.access import Access
from cargohold.config import RESIZE_SIGNAL, EngineConfig, read_secret
from cargohold.core.capability import SNAPSHOT_READS
from cargohold.core.cipher import VolumeCipher
from cargohold.core.iostats import VolumeIo
from cargohold.core.periodic import Periodic
from cargohold.errors import CargoholdError, InvalidArgument
from cargohold.services.engine.engine import Engine
from cargohold.stores.catalog import Catalog
from cargohold.stores.opener import open_store
from cargohold.stores.pki import client_context

log = logging.getLogger(__name__)

#: Seconds between two writes of the stats file.
STATS_INTERVAL = 2.0


async def serve(config: EngineConfig) -> int:
    """Run the engine until it is unmounted or told to stop; return the exit status."""
    store = open_store(config.metadata, config.tls,
                       read_secret(config.etcd_password_file, "--etcd-password-file"))
    try:
        held = _held(config)
        key = held.get("key")
        io = VolumeIo() if config.stats_file is not None else None
        engine = Engine(Catalog(store), config.volume, config.epoch, config.node,
                        str(config.mountpoint), config.heal_rate, config.scrub_rate,
                        _access(config, held), config.lease_ttl,
                        VolumeCipher(bytes.fromhex(key)) if key else None, io)
        await engine.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(RESIZE_SIGNAL, engine.refresh_size)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tmp = config.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "mountpoint": str(config.mountpoint)}))
        tmp.rename(config.ready_file)
        writer = None
        if io is not None and config.stats_file is not None:
            stats = StatsFile(config.stats_file, config.volume, config.epoch, io)
            writer = asyncio.ensure_future(
                Periodic("writing the I/O statistics", stats.run_once, STATS_INTERVAL)
                .run_forever())
        try:
            await engine.run(stop)
        finally:
            if writer is not None:
                writer.cancel()
        return 0
    finally:
        await store.close()


class StatsFile:
    """Where the engine's request counts go for the node to read (``/metrics``): one JSON
    object, replaced whole."""

    def __init__(self, path: Path, volume: str, epoch: int, io: VolumeIo) -> None:
        self.path, self.volume, self.epoch, self.io = path, volume, epoch, io

    async def run_once(self) -> None:
        data = {"volume": self.volume, "epoch": self.epoch, "pid": os.getpid(),
                "time": time.time(), "io": self.io.to_dict()}
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data))
            tmp.rename(self.path)
        except OSError as e:
            log.warning("cannot write %s: %s", self.path, e)


def _held(config: EngineConfig) -> dict[str, Any]:
    """What the node wrote for this attachment (capability, and an encrypted volume's key);
    the engine never sees the cluster key."""
    if config.capability_file is None:
        return {}
    try:
        held: dict[str, Any] = json.loads(config.capability_file.read_text())
        return held
    except (OSError, ValueError) as e:
        raise InvalidArgument(what="--capability-file",
                              detail=f"{config.capability_file}: {e}") from None


def _access(config: EngineConfig, held: dict[str, Any]) -> Access | None:
    """TLS to other hosts' data servers and the attachment's capability."""
    tls = None
    if config.tls is not None:
        tls = client_context(config.tls.ca, config.tls.cert, config.tls.key)
    else:
        log.warning("INSECURE: plaintext TCP to other hosts' data servers")
    granted = {}
    if held:
        try:
            granted[(str(held["volume_id"]), int(held["epoch"]))] = bytes.fromhex(
                held["capability"])
            if "origin" in held:  # a clone's source: its snapshots only
                granted[(str(held["origin"]["volume_id"]), SNAPSHOT_READS)] = bytes.fromhex(
                    held["origin"]["capability"])
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(what="--capability-file",
                                  detail=f"{config.capability_file}: {e}") from None
    if tls is None and not granted:
        return None
    return Access(tls=tls, node=config.node, granted=granted)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s engine[%(process)d] %(levelname)s %(message)s")
    try:
        return uvloop.run(serve(EngineConfig.from_argv(argv)))
    except CargoholdError as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
