"""One attached volume's engine: its replica set, its FUSE session and its healer.

The engine serves the volume's image file through FUSE (:mod:`.fuse`) to the loop device
the agent puts on it; every request goes to the :class:`~.replicaset.ReplicaSet`, which fans
it out to the in-sync replicas. Beside the data path the engine keeps two things in the
metadata store, and only while its attachment's epoch holds the volume: which replicas
failed (recorded *before* the write that found out is acknowledged), and the volume's size
when it grew (``refresh_size``, on the agent's ``RESIZE_SIGNAL``). The healer (:mod:`.healer`)
brings replicas back while the volume is in use.

The process around it (signals, ready file, event loop) is :mod:`cargohold.daemons.engine`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cargohold.clients.access import Access
from cargohold.clients.sharedmemory import SLOTS, SharedMemory
from cargohold.core.cipher import VolumeCipher
from cargohold.core.iostats import VolumeIo
from cargohold.core.models import ReplicaState, Volume
from cargohold.core.periodic import Periodic
from cargohold.core.retry import Backoff, retry
from cargohold.errors import CargoholdError, Fenced, InvalidArgument, LeaseLost
from cargohold.services.engine.cutter import Cutter
from cargohold.services.engine.encryption import EncryptedTarget
from cargohold.services.engine.fuse import (
    READ_BUFFER,
    BlockTarget,
    FuseSession,
    ring_slots,
    unmount,
)
from cargohold.services.engine.healer import INTERVAL, Healer
from cargohold.services.engine.leasewatch import INTERVAL as LEASE_INTERVAL
from cargohold.services.engine.leasewatch import LeaseWatch
from cargohold.services.engine.origin import REFRESH as ORIGIN_REFRESH
from cargohold.services.engine.origin import OriginTarget
from cargohold.services.engine.replicaset import ReplicaSet
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0
#: recording a failed replica waits out ~20 s of metadata outage before the I/O fails
RECORD_FAILURE = Backoff(first=0.05, most=1.0, attempts=40)


def out_of_sync_marker(catalog: Catalog, name: str,
                       epoch: int) -> Callable[[str, str], Awaitable[None]]:
    """The callback that records a failed replica, refusing if we were fenced."""

    async def mark(server_id: str, reason: str) -> None:
        def change(volume: Volume) -> Volume | None:
            if volume.attachment is None or volume.attachment.epoch != epoch:
                raise Fenced(volume_id=volume.id, epoch=epoch, current=volume.epoch)
            for replica in volume.replicas:
                if replica.server == server_id and replica.state is ReplicaState.IN_SYNC:
                    replica.state = ReplicaState.OUT_OF_SYNC
                    replica.reason = reason
                    return volume
            return None

        await retry(lambda: catalog.update_volume(name, change), RECORD_FAILURE,
                    what=f"recording that the replica of {name} on {server_id} failed")

    return mark


class Engine:
    """Serves one attachment (volume ``name`` at ``epoch``) at ``mountpoint``."""

    def __init__(self, catalog: Catalog, name: str, epoch: int, node: str, mountpoint: str,
                 heal_rate: float = 0.0, scrub_rate: float = 0.0,
                 access: Access | None = None, lease_ttl: float = 0.0,
                 cipher: VolumeCipher | None = None, io: VolumeIo | None = None) -> None:
        """``lease_ttl``: watch the node's lease and fail all I/O once it is lost (0: do
        not, as on one host, where no other can take the volume over); ``io``: count the
        kernel's requests there (None: do not)."""
        self.catalog = catalog
        self.io = io
        self.access = access
        self.lease_ttl = lease_ttl
        self.cipher = cipher  # an encrypted volume's (None: stored as written)
        self.name = name
        self.epoch = epoch
        self.node = node
        self.mountpoint = mountpoint
        self.heal_rate = heal_rate
        self.scrub_rate = scrub_rate
        self.replicas: ReplicaSet
        self.session: FuseSession
        self._shared: SharedMemory | None = None
        self.origin: OriginTarget | None = None  # a clone's, while it fills
        self._resizing: asyncio.Task[None] | None = None
        self._resize_again = False

    async def start(self) -> None:
        """Claim every in-sync replica with our epoch and mount FUSE; raise if fenced."""
        volume = await self.catalog.volume(self.name)
        if volume.attachment is None or volume.attachment.epoch != self.epoch:
            raise Fenced(volume_id=volume.id, epoch=self.epoch, current=volume.epoch)
        servers = {s.id: s for s in await self.catalog.servers()}
        self._shared = SharedMemory(READ_BUFFER, SLOTS + ring_slots())
        self.replicas = ReplicaSet(volume, servers, self.epoch, self.node,
                                   out_of_sync_marker(self.catalog, self.name, self.epoch),
                                   self._shared, self.access)
        try:
            await self.replicas.open()
        except BaseException:
            self._shared.close()
            raise
        volume_encrypted = volume.encryption is not None
        if volume_encrypted != (self.cipher is not None):
            await self.replicas.close()
            self._shared.close()
            raise InvalidArgument(what="volume key", detail=f"{self.name} is "
                                  f"{'' if volume_encrypted else 'not '}encrypted, and the "
                                  f"engine got {'a' if self.cipher else 'no'} key")
        if volume.origin is not None:  # a clone still filling
            try:
                self.origin = await OriginTarget.open(self.catalog, volume.origin,
                                                      self.replicas)
            except BaseException:
                await self.replicas.close()
                self._shared.close()
                raise
        plain: BlockTarget = self.origin if self.origin is not None else self.replicas
        target = EncryptedTarget(plain, self.cipher) if self.cipher is not None else plain
        self.session = FuseSession(target, self.mountpoint, self._shared, self.io)
        try:
            self.session.start()
        except OSError:
            if self.origin is not None:
                await self.origin.close()
            await self.replicas.close()
            self._shared.close()
            raise
        log.info("engine for %s (epoch %d) serving on %s", self.name, self.epoch,
                 self.mountpoint)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve and heal until ``stop`` is set or the kernel ends the FUSE session (an
        unmount), then drain, flush every replica and let go of everything."""
        healer = Healer(self.catalog, self.name, self.epoch, self.replicas, self.heal_rate,
                        self.scrub_rate, self.origin.joining if self.origin else None)
        duties = [asyncio.ensure_future(
            Periodic(f"healing {self.name}", healer.run_once, INTERVAL,
                     stop_on=(Fenced, LeaseLost)).run_forever())]
        cutter = Cutter(self.catalog, self.name, self.epoch, self.node, self.replicas)
        duties.append(asyncio.ensure_future(cutter.run_forever()))
        if self.origin is not None:
            duties.append(asyncio.ensure_future(
                Periodic(f"chunks of {self.name} filled", self.origin.refresh, ORIGIN_REFRESH,
                         wait_first=True).run_forever()))
        if self.lease_ttl:
            watch = LeaseWatch(self.catalog, self.node, self.lease_ttl,
                               self.replicas.lose_lease)
            duties.append(asyncio.ensure_future(
                Periodic(f"lease watch of {self.node}", watch.run_once, LEASE_INTERVAL,
                         wait_first=True, stop_on=(LeaseLost,)).run_forever()))
        stopped = asyncio.ensure_future(stop.wait())
        closed = asyncio.ensure_future(self.session.wait_closed())
        try:
            await asyncio.wait([stopped, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            for duty in duties:
                duty.cancel()
            await asyncio.gather(*duties, return_exceptions=True)
            await self._stop()

    async def _stop(self) -> None:
        await self.session.drain()
        try:
            await self.replicas.flush()
        except CargoholdError as e:
            log.error("final flush failed: %s", e)
        if self.session.fd >= 0:
            try:
                unmount(self.mountpoint, lazy=True)
            except OSError as e:
                log.warning("%s", e)
            try:
                await asyncio.wait_for(self.session.wait_closed(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("the kernel kept the FUSE connection open; closing it")
                self.session.close()
        if self.origin is not None:
            await self.origin.close()
        await self.replicas.close()
        if isinstance(self.session.target, EncryptedTarget):
            self.session.target.close()
        if self._shared is not None:
            self._shared.close()

    def refresh_size(self) -> None:
        """Take the volume's recorded size if it grew (the agent's ``RESIZE_SIGNAL``).

        The new size is read from the volume record (only while this attachment's epoch
        still holds it), checked against every replica (``ReplicaSet.grow``), and announced
        to the kernel (``FuseSession.resized``). The agent waits until ``stat`` of the FUSE
        file shows it. Signals that arrive during a refresh are folded into one more refresh.
        """
        if self._resizing is not None and not self._resizing.done():
            self._resize_again = True
            return
        self._resizing = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        while True:
            self._resize_again = False
            try:
                volume = await self.catalog.volume(self.name)
                if volume.attachment is None or volume.attachment.epoch != self.epoch:
                    log.warning("%s: not resizing: the volume is no longer attached with "
                                "epoch %d", self.name, self.epoch)
                elif await self.replicas.grow(volume.size):
                    self.session.resized()
            except (CargoholdError, OSError) as e:
                log.error("%s: resize failed: %s", self.name, e)
            if not self._resize_again:
                return
