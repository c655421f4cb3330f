"""Copying and checking chunks between the replicas of a volume.

Shared by the controller's duties on detached volumes (resync, scrub, rebuild) and by an
attached volume's engine (catch-up, attach-time reconcile, scrub in use): the window of
chunks copied at once, how a copied range is stored, a byte-rate budget, and the scrub's
report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from cargohold.clients.dataclient import DataClient
from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.wire import BytesLike

WINDOW = 8  # chunks copied at once (the data client pipelines requests)
_ZEROS = memoryview(bytes(CHUNK_SIZE))


@dataclass
class ScrubReport:
    volume: str
    chunks: int = 0  # chunks written on some replica, each read from every in-sync copy
    bytes_read: int = 0
    repaired: list[dict[str, object]] = field(default_factory=list)  # {chunk, server}
    lost: list[int] = field(default_factory=list)  # chunks without a single clean copy
    skipped: list[str] = field(default_factory=list)  # in-sync replicas out of reach
    seconds: float = 0.0


async def put_copy(client: DataClient, volume_id: str, epoch: int, offset: int,
                   data: BytesLike, generation: int) -> None:
    """Store a range copied from another replica; a range of zeros is stored as a trim.

    Trims take generations like writes, so a chunk trimmed while a replica was away is
    copied to it: as a trim, it stays as thin there as in its source.
    """
    if memoryview(data) == _ZEROS[: len(data)]:
        await client.trim(volume_id, epoch, offset, len(data), generation, copy=True)
    else:
        await client.write(volume_id, epoch, offset, data, generation)


async def together(workers: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``workers`` at once until all are done; the first failure cancels the others
    (and is raised once they have stopped)."""
    tasks = [asyncio.ensure_future(worker) for worker in workers]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Budget:
    """A byte-rate limit: spend() sleeps when the copy runs ahead of ``rate``."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.start = clock()
        self.spent = 0

    async def spend(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        self.spent += nbytes
        ahead = self.spent / self.rate - (self.clock() - self.start)
        if ahead > 0:
            await self.sleep(ahead)
