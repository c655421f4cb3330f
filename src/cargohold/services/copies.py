"""Copying and checking chunks between the replicas of a volume.

Shared by the controller's duties on detached volumes (resync, scrub, rebuild) and by an
attached volume's engine (catch-up, attach-time reconcile, scrub in use): the window of
chunks copied at once, how a copied range is stored, a byte-rate budget, and the scrub's
report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from cargohold.clients.access import Access
from cargohold.clients.dataclient import CONTROL_TIMEOUT, DataClient
from cargohold.core.layout import BLOCK_SIZE, CHUNK_SIZE
from cargohold.core.models import DataServer, Snapshot
from cargohold.core.wire import BytesLike
from cargohold.errors import CargoholdError, SnapshotFailed

log = logging.getLogger(__name__)

#: A replica reading every block its snapshots hold apart answers within this.
SCRUB_TIMEOUT = 3600.0
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


async def snapshot_reader(snapshot: Snapshot, servers: Mapping[str, DataServer],
                          access: Access | None, stack: AsyncExitStack) -> DataClient:
    """A connection (closed with ``stack``) to the first data server keeping ``snapshot``
    that answers; ``SnapshotFailed`` saying why none did."""
    problems = []
    for sid in snapshot.servers:
        server = servers.get(sid)
        if server is None:
            continue
        client = DataClient(server.address, server.id, call_timeout=CONTROL_TIMEOUT,
                            access=access, peer=server.node)
        try:
            await client.connect()
        except CargoholdError as e:
            await client.close()
            problems.append(f"{sid}: {e}")
            continue
        stack.push_async_callback(client.close)
        return client
    raise SnapshotFailed(name=snapshot.ref, detail="no data server that keeps it answers: "
                         + ("; ".join(problems) or "none is registered"))


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


async def replay_snapshots(source: DataClient, target: DataClient, volume_id: str,
                           epoch: int, size: int) -> int:
    """Give ``target`` the snapshots ``source`` keeps and it lacks, oldest first, each with
    the source's data; forget on ``target`` those ``source`` no longer keeps. Return how
    many were given. Call it before the head is copied.

    For each snapshot missing, the chunks that differ between the one before it and it are
    copied from the snapshot into ``target``'s head, then the snapshot is taken there: the
    target ends with the same snapshots, and the same data in each (its own versions made
    by redirect-on-write, as the source's were). Those writes carry generation 0, so the
    head copy that follows still copies every chunk whose head differs.
    """
    kept = await source.snapshots(volume_id)
    kept_ids = [s["id"] for s in kept]
    have_ids = [s["id"] for s in await target.snapshots(volume_id)]
    prefix = 0
    while prefix < len(kept_ids) and prefix < len(have_ids) \
            and have_ids[prefix] == kept_ids[prefix]:
        prefix += 1
    # anything beyond the common start is rebuilt (a snapshot deleted meanwhile, or one
    # after a gap: the target missed the snapshots in between)
    for stale in have_ids[prefix:]:
        await target.delete_snapshot(volume_id, epoch, stale)
    previous = kept_ids[prefix - 1] if prefix else ""
    given = 0
    for snapshot in kept[prefix:]:
        chunks = set(await source.snapshot_diff(volume_id, previous, snapshot["id"]))
        if not given:  # the target's own head may have moved on from ``previous``
            chunks.update(await target.snapshot_diff(volume_id, previous, ""))
        for chunk in sorted(chunks):
            offset = chunk * CHUNK_SIZE
            length = min(CHUNK_SIZE, size - offset)
            if length <= 0:
                continue
            data = await source.read_snapshot(volume_id, epoch, snapshot["id"], offset, length)
            await put_copy(target, volume_id, epoch, offset, data, 0)
        await target.snapshot(volume_id, epoch, snapshot["id"], float(snapshot["created"]))
        previous = snapshot["id"]
        given += 1
    return given


async def scrub_snapshots(clients: dict[str, DataClient], volume_id: str, epoch: int,
                          report: ScrubReport) -> None:
    """Have every replica read what its snapshots hold apart from the head; a block whose
    checksum fails is written back from another replica's copy of that snapshot (whose
    read is verified), or counted lost when no replica has a good one."""
    for sid, client in clients.items():
        try:
            bad = await client.scrub_snapshots(volume_id, epoch, timeout=SCRUB_TIMEOUT)
        except CargoholdError as e:
            report.skipped.append(sid)
            log.warning("scrub of the snapshots of %s on %s: %s", volume_id, sid, e)
            continue
        for snapshot_id, offset in bad:
            good = None
            for other, source in clients.items():
                if other == sid:
                    continue
                try:
                    good = await source.read_snapshot(volume_id, epoch, snapshot_id, offset,
                                                      BLOCK_SIZE)
                    break
                except CargoholdError:
                    continue
            if good is None:
                report.lost.append(offset // CHUNK_SIZE)
                continue
            await client.repair_snapshot(volume_id, epoch, snapshot_id, offset, good)
            report.repaired.append({"chunk": offset // CHUNK_SIZE, "server": sid,
                                    "snapshot": snapshot_id})
