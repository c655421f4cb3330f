"""Restoring backups into new volumes, and checking that a backup can be restored.

A restore makes a new volume (placed like any, with the backup's size and file system; an
encrypted volume's backup brings its key), marked *restoring* so that nobody attaches it,
takes a new epoch on it, and fetches the backup's blocks ``FETCHES`` at a time: each is
fetched once, its hash checked, and written to every chunk that holds it in every replica
(one download for N replicas, and for N chunks with the same contents). Blocks the
backup does not list stay holes. Once every replica has flushed, the mark goes and the
volume is usable. A restore that fails (a block missing or damaged, the target gone, a data
server full) removes the half-made volume, and says why.

A *standby* restore stays marked: it follows the backups of its source volume. The
controller looks for a newer complete backup every ``FOLLOW_EVERY`` seconds and applies it
incrementally (the blocks whose names differ from the backup held, and holes trimmed), so a
standby is one backup behind at most; ``activate`` makes it a volume of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

from cargohold.clients.objectstore import PARALLEL
from cargohold.core import backupformat as fmt
from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.models import BackupJob, BackupState, Volume
from cargohold.core.names import check_name
from cargohold.errors import (
    BackupCorrupt,
    CargoholdError,
    InvalidArgument,
    VolumeBusy,
    VolumeExists,
)
from cargohold.services.backups import PROGRESS_EVERY, BackupService, Target
from cargohold.services.controller.resync import RESTORE, claim_detached
from cargohold.services.copies import together
from cargohold.services.volumes import ServerSession, VolumeService

log = logging.getLogger(__name__)


#: Blocks fetched at once: as many as the target's client has connections.
FETCHES = PARALLEL
#: Seconds between a standby's looks for a newer backup.
FOLLOW_EVERY = 10.0


class RestoreService:
    def __init__(self, backups: BackupService, volumes: VolumeService) -> None:
        self.backups = backups
        self.volumes = volumes
        self.catalog = backups.catalog
        self._next_look: dict[str, float] = {}

    async def restore(self, backup_id: str, to: str, replicas: int | str | None = None,
                      wait: bool = False, standby: bool = False) -> BackupJob:
        """Restore backup ``backup_id`` into a new volume ``to``; returns the job (done,
        with ``wait``). A ``standby`` then takes each newer backup of the same volume as
        it comes (``follow``), and cannot be attached until ``activate``."""
        check_name(to)
        if await self.catalog.find_volume(to) is not None:
            raise VolumeExists(name=to)
        async with self.backups.open_target() as target:
            manifest = await self.backups.manifest(backup_id, target)
        blocks = fmt.blocks_of(manifest, backup_id)
        bases = fmt.bases_of(manifest, backup_id)
        key = bytes.fromhex(manifest["volume_key"]) if manifest.get("volume_key") else None
        volume = await self.volumes.create(
            to, int(manifest["size"]), replicas if replicas is not None else 2,
            str(manifest["fs"]), key=key, source=f"backup {backup_id}", restoring=backup_id)
        job = BackupJob(id=f"restore-{uuid.uuid4().hex[:12]}", kind="restore", volume=to,
                        backup=backup_id, node=self.backups.node)
        await self.catalog.start_backup_job(job)
        follows = str(manifest["volume"]) if standby else ""
        return await self.backups.launch(self._run(job, volume, blocks, bases, follows), job,
                                         wait)

    async def _run(self, job: BackupJob, volume: Volume, blocks: dict[int, str],
                   bases: dict[str, str], follows: str) -> None:
        try:
            async with self.backups.open_target() as target:
                await self._write(job, volume, blocks, bases, target, (), follows)
        except BaseException as e:
            reason = "interrupted" if isinstance(e, asyncio.CancelledError) else str(e)
            log.error("restore of backup %s into %s failed: %s", job.backup, job.volume,
                      reason)
            job.state, job.error, job.finished = BackupState.FAILED, reason, time.time()
            with contextlib.suppress(CargoholdError):
                await asyncio.shield(self.catalog.put_backup_job(job))
            with contextlib.suppress(CargoholdError):  # nothing half made is left
                await asyncio.shield(self.volumes.remove(job.volume))
            if not isinstance(e, CargoholdError | asyncio.CancelledError):
                raise

    async def _write(self, job: BackupJob, volume: Volume, blocks: dict[int, str],
                     bases: dict[str, str], target: Target, holes: Sequence[int],
                     follows: str) -> None:
        """Write ``blocks`` (and trim the chunks ``holes``) into every replica; then the
        volume is usable, or a standby of ``follows`` that holds backup ``job.backup``."""
        claimed = await claim_detached(self.catalog, volume.name, RESTORE)
        epoch = claimed.epoch
        generation = (epoch << 32) + 1
        servers = {s.id: s for s in await self.catalog.servers()}
        reported = time.monotonic()
        done = 0
        async with AsyncExitStack() as stack:
            writers = [await stack.enter_async_context(ServerSession(servers[r.server],
                                                                     self.backups.access,
                                                                     copying=True))
                       for r in claimed.replicas]
            # each distinct block is fetched once, for every chunk that holds it (a chunk
            # the same as another, as in volumes dedup finds, costs a write, not a GET)
            chunks_of: dict[str, list[int]] = {}
            for index, name in sorted(blocks.items()):
                chunks_of.setdefault(name, []).append(index)
            pending = iter(chunks_of.items())

            async def restorer() -> None:
                nonlocal done, reported
                for name, indexes in pending:
                    data = await self.backups.content(name, bases, target)
                    for index in indexes:
                        if len(data) != min(CHUNK_SIZE, claimed.size - index * CHUNK_SIZE):
                            raise BackupCorrupt(what=f"block {name}", detail=f"{len(data)} "
                                                "bytes where the volume has "
                                                f"{claimed.size - index * CHUNK_SIZE}")
                    for at in range(0, len(indexes), FETCHES):  # a shared block: in parallel
                        await asyncio.gather(*(w.write(claimed.id, epoch, index * CHUNK_SIZE,
                                                       data, generation)
                                               for index in indexes[at:at + FETCHES]
                                               for w in writers))
                    job.bytes += len(data) * len(indexes)
                    done += len(indexes)
                    if time.monotonic() - reported >= PROGRESS_EVERY:
                        reported = time.monotonic()
                        job.progress = round(min(done / len(blocks), 0.999), 3)
                        await self.catalog.put_backup_job(job)

            await together([restorer() for _ in range(FETCHES)])
            for index in holes:  # chunks the newer backup has no data in
                offset = index * CHUNK_SIZE
                length = min(CHUNK_SIZE, claimed.size - offset)
                await asyncio.gather(*(w.trim(claimed.id, epoch, offset, length, generation)
                                       for w in writers))
            await asyncio.gather(*(w.flush(claimed.id, epoch) for w in writers))

        def usable(v: Volume) -> Volume:
            v.restoring, v.standby = (job.backup, follows) if follows else ("", "")
            return v

        await self.catalog.update_volume(volume.name, usable)
        job.state, job.progress, job.finished = BackupState.COMPLETE, 1.0, time.time()
        await self.catalog.put_backup_job(job)
        log.info("backup %s restored into %s: %d blocks, %d bytes", job.backup, volume.name,
                 len(blocks), job.bytes)

    async def verify(self, backup_id: str, wait: bool = True) -> BackupJob:
        """Fetch every block of a backup and check its hash; the job names the bad ones
        (``bad``) and shows its progress meanwhile. An unknown backup is refused at once."""
        async with self.backups.open_target() as target:
            found = await self.backups.manifest(backup_id, target)
        job = BackupJob(id=f"verify-{uuid.uuid4().hex[:12]}", kind="verify",
                        volume=str(found["volume"]), backup=backup_id, node=self.backups.node)
        await self.catalog.start_backup_job(job)
        return await self.backups.launch(self._verify(job, found), job, wait)

    async def _verify(self, job: BackupJob, found: dict[str, Any]) -> None:
        try:
            async with self.backups.open_target() as target:
                await self._check(job, found, target)
        except BaseException as e:
            job.state, job.finished = BackupState.FAILED, time.time()
            job.error = "interrupted" if isinstance(e, asyncio.CancelledError) else str(e)
            with contextlib.suppress(CargoholdError):
                await asyncio.shield(self.catalog.put_backup_job(job))
            if not isinstance(e, CargoholdError | asyncio.CancelledError):
                raise

    async def _check(self, job: BackupJob, found: dict[str, Any], target: Target) -> None:
        blocks = fmt.blocks_of(found, job.backup)
        bases = fmt.bases_of(found, job.backup)
        names = sorted(set(blocks.values()))
        pending = iter(names)
        reported = time.monotonic()

        async def checker() -> None:
            nonlocal reported
            for name in pending:
                try:  # a delta: checked with its bases, as a restore reads it
                    job.bytes += len(await self.backups.content(name, bases, target))
                except BackupCorrupt as e:
                    job.bad[name] = e.message
                job.blocks += 1
                if time.monotonic() - reported >= PROGRESS_EVERY:
                    reported = time.monotonic()
                    job.progress = round(min(job.blocks / len(names), 0.999), 3)
                    await self.catalog.put_backup_job(job)

        await together([checker() for _ in range(FETCHES)])
        job.state, job.progress, job.finished = BackupState.COMPLETE, 1.0, time.time()
        await self.catalog.put_backup_job(job)
        log.info("backup %s verified: %d blocks, %d bad", job.backup, job.blocks, len(job.bad))

    async def follow(self, name: str) -> str:
        """Bring standby ``name`` to the newest complete backup of the volume it follows:
        only the blocks that differ from the backup it holds are written (and the chunks
        that became holes trimmed). Returns the backup applied ("" if it was up to date)."""
        volume = await self.catalog.volume(name)
        if not volume.standby:
            raise InvalidArgument(what="volume", detail=f"{name!r} is not a standby")
        newer = [b for b in await self.backups.listing(volume.standby)
                 if b["state"] == "complete"]
        if not newer or newer[-1]["id"] == volume.restoring:
            return ""
        latest = newer[-1]["id"]
        async with self.backups.open_target() as target:
            held = fmt.blocks_of(await self.backups.manifest(volume.restoring, target),
                                 volume.restoring)
            wanted_manifest = await self.backups.manifest(latest, target)
        wanted = fmt.blocks_of(wanted_manifest, latest)
        bases = fmt.bases_of(wanted_manifest, latest)
        if int(wanted_manifest["size"]) != volume.size:
            raise InvalidArgument(what="standby", detail=f"backup {latest} of "
                                  f"{volume.standby} has another size than {name} (resized "
                                  "since): restore it into a new volume")
        job = BackupJob(id=f"restore-{uuid.uuid4().hex[:12]}", kind="restore", volume=name,
                        backup=latest, node=self.backups.node)
        await self.catalog.start_backup_job(job)
        changed = {i: n for i, n in wanted.items() if held.get(i) != n}
        holes = sorted(held.keys() - wanted.keys())
        try:
            async with self.backups.open_target() as target:
                await self._write(job, volume, changed, bases, target, holes,
                                  volume.standby)
        except BaseException as e:  # the standby keeps what it held: the next turn retries
            job.state, job.error, job.finished = BackupState.FAILED, str(e), time.time()
            with contextlib.suppress(CargoholdError):
                await asyncio.shield(self.catalog.put_backup_job(job))
            raise
        log.info("standby %s follows %s: backup %s applied (%d blocks written, %d trimmed)",
                 name, volume.standby, latest, len(changed), len(holes))
        return latest

    async def follow_all(self) -> None:
        """The controller's turn: each standby takes the newest backup, at most every
        ``FOLLOW_EVERY`` seconds each."""
        now = time.monotonic()
        for volume in await self.catalog.volumes():
            if not volume.standby or now < self._next_look.get(volume.name, 0.0):
                continue
            self._next_look[volume.name] = now + FOLLOW_EVERY
            try:
                await self.follow(volume.name)
            except CargoholdError as e:
                log.warning("standby %s not brought up to date now: %s", volume.name, e)

    async def activate(self, name: str) -> Volume:
        """Make standby ``name`` a volume of its own: it follows no backups any more and can
        be attached."""
        running = [j for j in await self.catalog.backup_jobs() if j.volume == name
                   and j.kind == "restore" and j.state is BackupState.RUNNING]
        if running:
            raise VolumeBusy(name=name, state=f"applying backup {running[0].backup}")

        def active(v: Volume) -> Volume:
            if not v.standby:
                raise InvalidArgument(what="volume", detail=f"{name!r} is not a standby")
            v.standby, v.restoring = "", ""
            return v

        volume = await self.catalog.update_volume(name, active)
        log.info("standby %s activated", name)
        return volume
