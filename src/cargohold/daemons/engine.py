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
from collections.abc import Sequence

import uvloop

from cargohold.config import RESIZE_SIGNAL, EngineConfig
from cargohold.errors import CargoholdError
from cargohold.services.engine.engine import Engine
from cargohold.stores.catalog import Catalog
from cargohold.stores.opener import open_store

log = logging.getLogger(__name__)


async def serve(config: EngineConfig) -> int:
    """Run the engine until it is unmounted or told to stop; return the exit status."""
    store = open_store(config.metadata)
    try:
        engine = Engine(Catalog(store), config.volume, config.epoch, config.node,
                        str(config.mountpoint), config.heal_rate, config.scrub_rate)
        await engine.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(RESIZE_SIGNAL, engine.refresh_size)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tmp = config.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "mountpoint": str(config.mountpoint)}))
        tmp.rename(config.ready_file)
        await engine.run(stop)
        return 0
    finally:
        await store.close()


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
