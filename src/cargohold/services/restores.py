"""Restoring backups into new volumes, and checking that a backup can be restored.

A restore makes a new volume (placed like any, with the backup's size and file system; an
encrypted volume's backup brings its key), marked *restoring* so that nobody attaches it,
takes a new epoch on it, and fetches the backup's blocks ``WINDOW`` at a time: each is
fetched once, its hash checked, and written to every replica (one download for N
replicas). Blocks the backup does not list stay holes. Once every replica has flushed, the
mark goes and the volume is usable. A restore that fails (a block missing or damaged, the
target gone, a data server full) removes the half-made volume, and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

from cargohold.core import backupformat as fmt
from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.models import BackupJob, BackupState, Volume
from cargohold.core.names import check_name
from cargohold.errors import BackupCorrupt, CargoholdError, VolumeExists
from cargohold.services.backups import PROGRESS_EVERY, BackupService, Target
from cargohold.services.controller.resync import RESTORE, claim_detached
from cargohold.services.copies import WINDOW, together
from cargohold.services.volumes import ServerSession, VolumeService

log = logging.getLogger(__name__)


class RestoreService:
    def __init__(self, backups: BackupService, volumes: VolumeService) -> None:
        self.backups = backups
        self.volumes = volumes
        self.catalog = backups.catalog

    async def restore(self, backup_id: str, to: str, replicas: int | str | None = None,
                      wait: bool = False) -> BackupJob:
        """Restore backup ``backup_id`` into a new volume ``to``; returns the job (done,
        with ``wait``)."""
        check_name(to)
        if await self.catalog.find_volume(to) is not None:
            raise VolumeExists(name=to)
        async with self.backups.open_target() as target:
            manifest = await self.backups.manifest(backup_id, target)
        blocks = fmt.blocks_of(manifest, backup_id)
        key = bytes.fromhex(manifest["volume_key"]) if manifest.get("volume_key") else None
        volume = await self.volumes.create(
            to, int(manifest["size"]), replicas if replicas is not None else 2,
            str(manifest["fs"]), key=key, source=f"backup {backup_id}", restoring=backup_id)
        job = BackupJob(id=f"restore-{uuid.uuid4().hex[:12]}", kind="restore", volume=to,
                        backup=backup_id, node=self.backups.node)
        await self.catalog.start_backup_job(job)
        return await self.backups.launch(self._run(job, volume, blocks), job, wait)

    async def _run(self, job: BackupJob, volume: Volume, blocks: dict[int, str]) -> None:
        try:
            async with self.backups.open_target() as target:
                await self._write(job, volume, blocks, target)
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
                     target: Target) -> None:
        claimed = await claim_detached(self.catalog, volume.name, RESTORE)
        epoch = claimed.epoch
        generation = (epoch << 32) + 1
        servers = {s.id: s for s in await self.catalog.servers()}
        reported = time.monotonic()
        done = 0
        async with AsyncExitStack() as stack:
            writers = [await stack.enter_async_context(ServerSession(servers[r.server],
                                                                     self.backups.access))
                       for r in claimed.replicas]
            pending = iter(sorted(blocks.items()))

            async def restorer() -> None:
                nonlocal done, reported
                for index, name in pending:
                    blob = await target.store.get(fmt.block_key(name))
                    data = await asyncio.to_thread(target.codec.decode_block, name, blob)
                    offset = index * CHUNK_SIZE
                    if len(data) != min(CHUNK_SIZE, claimed.size - offset):
                        raise BackupCorrupt(what=f"block {name}", detail=f"{len(data)} bytes "
                                            f"where the volume has {claimed.size - offset}")
                    await asyncio.gather(*(w.write(claimed.id, epoch, offset, data, generation)
                                           for w in writers))
                    job.bytes += len(data)
                    done += 1
                    if time.monotonic() - reported >= PROGRESS_EVERY:
                        reported = time.monotonic()
                        job.progress = round(min(done / len(blocks), 0.999), 3)
                        await self.catalog.put_backup_job(job)

            await together([restorer() for _ in range(WINDOW)])
            await asyncio.gather(*(w.flush(claimed.id, epoch) for w in writers))

        def usable(v: Volume) -> Volume:
            v.restoring = ""
            return v

        await self.catalog.update_volume(volume.name, usable)
        job.state, job.progress, job.finished = BackupState.COMPLETE, 1.0, time.time()
        await self.catalog.put_backup_job(job)
        log.info("backup %s restored into %s: %d blocks, %d bytes", job.backup, volume.name,
                 len(blocks), job.bytes)

    async def verify(self, backup_id: str) -> dict[str, Any]:
        """Fetch every block of a backup and check its hash; name the bad ones."""
        started = time.monotonic()
        bad: dict[str, str] = {}
        async with self.backups.open_target() as target:
            blocks = fmt.blocks_of(await self.backups.manifest(backup_id, target), backup_id)
            pending = iter(sorted(set(blocks.values())))

            async def checker() -> None:
                for name in pending:
                    try:
                        blob = await target.store.get(fmt.block_key(name))
                        await asyncio.to_thread(target.codec.decode_block, name, blob)
                    except BackupCorrupt as e:
                        bad[name] = e.message

            await together([checker() for _ in range(WINDOW)])
        return {"id": backup_id, "blocks": len(set(blocks.values())), "bad": bad,
                "ok": not bad, "seconds": round(time.monotonic() - started, 3)}
