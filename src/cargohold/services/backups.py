"""Backups to an S3-compatible target: taken from snapshots, incremental, deduplicated.

The format is :mod:`cargohold.core.backupformat` (docs/backup-format.md). A backup reads a
snapshot of the volume (taken for it, or one named), so the volume stays in use. Only the
chunks that changed since the previous backup's snapshot are read, found from the replicas'
own records of what each snapshot wrote (SNAPSHOT_DIFF), never by reading the volume: that
snapshot is kept until the next backup is complete (it holds what was overwritten since,
like any snapshot). The first backup, or one whose previous snapshot is gone, reads every
chunk that holds data. Each block is named by its (keyed) hash and uploaded only if the
target has no block of that name yet, from any volume; a chunk in which at most half of
the 4 KiB pieces changed is uploaded as a delta on the previous backup's block (the
previous snapshot, still kept, says which pieces changed). The manifest lists every block of
the volume (restorable alone); the summary, written last, makes the backup complete: a
backup that failed midway shows as failed (from its job), never as complete, and leaves
at most blocks that the next collection removes or a retry reuses.

Collection (``backup rm``, retention) deletes the blocks no complete backup references. It
must not delete a block a running backup has just found in the target (and so did not
upload) or uploaded but not yet listed in a manifest. So it sweeps only while no backup
runs: it sets ``backup/collecting`` and then looks for running backups, and a backup
records itself running and then looks for a collection (each sees the other's record, the
metadata store being linearizable): a backup waits for the sweep (deletes only, short), and
the sweep waits for running backups up to ``COLLECT_WAIT``; past that the collection is
left pending and the controller runs it once no backup runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cargohold.clients.access import Access
from cargohold.clients.dataclient import DataClient
from cargohold.clients.objectstore import ObjectStore
from cargohold.core import backupformat as fmt
from cargohold.core.capability import SNAPSHOT_READS
from cargohold.core.cipher import unwrap_key, wrap_key
from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.models import (
    BackupBase,
    BackupJob,
    BackupState,
    BackupTarget,
    LastBackup,
    Snapshot,
    SnapshotState,
    Volume,
)
from cargohold.core.names import check_name, split_snapshot
from cargohold.errors import (
    BackupCorrupt,
    BackupNotFound,
    BackupRunning,
    BackupTargetNotSet,
    CargoholdError,
    InvalidArgument,
    VolumeBusy,
)
from cargohold.services.copies import WINDOW, snapshot_reader, together
from cargohold.services.snapshots import SnapshotService
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import Compare, Delete

log = logging.getLogger(__name__)

COLLECTING_KEY = "backup/collecting"
COLLECT_PENDING_KEY = "backup/collect-pending"
#: How long a collection waits for running backups before it is left to the controller.
COLLECT_WAIT = 30.0
#: Seconds between progress records of a job.
PROGRESS_EVERY = 1.0
_POLL = 0.2


@dataclass
class Target:
    """The backup target, open: its record, its objects and its codec."""

    record: BackupTarget
    store: ObjectStore
    codec: fmt.Codec


def target_view(target: BackupTarget) -> dict[str, Any]:
    return {"url": target.url, "endpoint": target.endpoint, "region": target.region,
            "encrypted": bool(target.key), "set_at": target.set_at}


class BackupService:
    def __init__(self, catalog: Catalog, snapshots: SnapshotService,
                 access: Access | None = None, node: str = "") -> None:
        self.catalog = catalog
        self.snapshots = snapshots
        self.access = access
        self.node = node
        self._tasks: set[asyncio.Task[None]] = set()
        self._mine: set[str] = set()  # ids of the jobs this process runs
        self._collecting = False  # a collection of this process sweeps

    # -- the target ----------------------------------------------------------------------

    async def set_target(self, url: str, endpoint: str = "", region: str = "",
                         secret: bytes | None = None) -> dict[str, Any]:
        """Use ``url`` (s3://BUCKET/PREFIX) as the target, checked first: the bucket
        answers to the node's credentials, and a target used before was used with the
        same key (or none)."""
        wrapped = ""
        if secret is not None:
            fmt.Keys.from_secret(secret)  # checks it
            if self.access is None or not self.access.key:
                raise InvalidArgument(what="encryption key", detail="an encrypted target "
                                      "needs the cluster key to keep its key (not "
                                      "--insecure-plaintext)")
            wrapped = wrap_key(self.access.key, _KEY_ID, secret)
        record = BackupTarget(url=url, endpoint=endpoint, region=region, key=wrapped)
        async with self.open_target(record) as target:
            await target.store.check()
            found = await target.store.find(fmt.MARKER)
            if found is None:
                await target.store.put(fmt.MARKER, target.codec.marker())
            else:
                target.codec.check_marker(found)
        await self.catalog.set_backup_target(record)
        log.info("backup target is %s (%s)", url, "encrypted" if wrapped else "not encrypted")
        return target_view(record)

    async def target(self) -> dict[str, Any]:
        record = await self.catalog.backup_target()
        if record is None:
            raise BackupTargetNotSet()
        return target_view(record)

    @contextlib.asynccontextmanager
    async def open_target(self, record: BackupTarget | None = None) -> AsyncIterator[Target]:
        record = record or await self.catalog.backup_target()
        if record is None:
            raise BackupTargetNotSet()
        keys = None
        if record.key:
            if self.access is None or not self.access.key:
                raise InvalidArgument(what="backup target", detail="it is encrypted, and "
                                      "this node has no cluster key to open its key")
            keys = fmt.Keys.from_secret(unwrap_key(self.access.key, _KEY_ID, record.key))
        store = ObjectStore(record.url, record.endpoint, record.region)
        try:
            yield Target(record, store, fmt.Codec(keys))
        finally:
            store.close()

    # -- taking one ----------------------------------------------------------------------

    async def create(self, volume: str, snapshot: str = "", wait: bool = False) -> BackupJob:
        """Back ``volume`` up from snapshot ``snapshot`` (VOLUME@NAME or NAME; default: a
        snapshot taken now); returns the job (done, with ``wait``)."""
        check_name(volume)
        source = await self.catalog.volume(volume)
        async with self.open_target() as target:  # fail early: no target, bad credentials
            await target.store.check()
        job = BackupJob(id=_new_id(), kind="backup", volume=volume, node=self.node)
        await self._register(job)
        try:
            taken, own = await self._snapshot(source, snapshot, job.id)
        except BaseException as e:
            await self._fail(job, str(e))
            raise
        job.snapshot = taken.name
        await self.catalog.put_backup_job(job)
        await self._record_last(volume, job)
        return await self.launch(self._backup(job, taken, own), job, wait)

    async def _register(self, job: BackupJob) -> None:
        """Record the job running, unless another backup of its volume runs; never while
        a collection sweeps (see the module's docstring: record, then look)."""
        while True:
            await self._wait_for_collection()
            running = await self.catalog.start_backup_job(job)
            if running:
                stale = await self.catalog.backup_job(running)
                if stale is not None and await self._alive(stale):
                    raise BackupRunning(name=job.volume, id=running)
                await self._fail(stale or job.model_copy(update={"id": running}),
                                 "its node stopped")
                continue
            self._mine.add(job.id)
            if await self.catalog.store.get(COLLECTING_KEY) is None:
                return
            self._mine.discard(job.id)  # a collection began: step back until it is done
            await self.catalog.drop_backup_job(job.id, job.volume)

    async def _snapshot(self, volume: Volume, name: str, job_id: str) -> tuple[Snapshot, bool]:
        if not name:
            return await self.snapshots.create(volume.name, f"backup-{job_id}"), True
        if "@" in name:
            owner, name = split_snapshot(name)
            if owner != volume.name:
                raise InvalidArgument(what="snapshot", detail=f"{owner}@{name} is not a "
                                      f"snapshot of {volume.name}")
        found = await self.catalog.snapshot(volume.name, name)
        if found.state is not SnapshotState.READY or found.volume_id != volume.id:
            raise VolumeBusy(name=found.ref, state=found.state.value)
        return found, False

    async def launch(self, work: Any, job: BackupJob, wait: bool) -> BackupJob:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if wait:
            await asyncio.shield(task)
            return await self.catalog.backup_job(job.id) or job
        return job

    async def stop(self) -> None:
        """Stop the jobs this node runs (the node stops): they end as failed."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _backup(self, job: BackupJob, snapshot: Snapshot, own: bool) -> None:
        try:
            async with self.open_target() as target:
                await self._upload(job, snapshot, own, target)
        except BaseException as e:
            reason = "interrupted" if isinstance(e, asyncio.CancelledError) else str(e)
            log.error("backup %s of %s failed: %s", job.id, job.volume, reason)
            await asyncio.shield(self._fail(job, reason))
            if own:
                with contextlib.suppress(CargoholdError):
                    await asyncio.shield(self.snapshots.remove(job.volume, snapshot.name))
            if not isinstance(e, CargoholdError | asyncio.CancelledError):
                raise

    async def _upload(self, job: BackupJob, snapshot: Snapshot, own: bool,
                      target: Target) -> None:
        volume = await self.catalog.volume(job.volume)
        previous, chunks = await self._changes(volume, snapshot, target)
        chunks = [c for c in chunks if c * CHUNK_SIZE < snapshot.size]
        whole = {k.rpartition("/")[2] for k in await target.store.names("blocks/")}
        listed: dict[str, str] = {}  # deltas in the target (their keys name their bases)
        for found in await target.store.names("deltas/"):
            delta, _, base = found.rpartition("/")[2].partition(".")
            listed.setdefault(delta, base)
        bases = dict(previous.bases)  # the deltas this backup's manifest refers to
        claimed: set[str] = set()  # uploaded (or being uploaded) by this run

        def kept(name: str) -> bool:
            """Whether the target holds block ``name``: whole, or as deltas that end in a
            whole block within MAX_CHAIN (their bases then go into the manifest)."""
            chain: dict[str, str] = {}
            at = name
            while at not in whole:
                base = bases.get(at) or listed.get(at)
                if base is None or len(chain) >= fmt.MAX_CHAIN:
                    return False
                chain[at] = base
                at = base
            bases.update(chain)
            return True

        blocks = {c: n for c, n in previous.blocks.items() if c * CHUNK_SIZE < snapshot.size}
        stored = 0
        reported = time.monotonic()
        done = 0
        async with self._reader(snapshot) as reader:
            pending = iter(chunks)

            async def uploader() -> None:
                nonlocal stored, reported, done
                for chunk in pending:
                    offset = chunk * CHUNK_SIZE
                    data = await reader.read_snapshot(
                        snapshot.volume_id, SNAPSHOT_READS, snapshot.id, offset,
                        min(CHUNK_SIZE, snapshot.size - offset))
                    if not any(data):  # zeros: no block (restores as a hole)
                        blocks.pop(chunk, None)
                    else:
                        name = await asyncio.to_thread(target.codec.name, data)
                        blocks[chunk] = name
                        if name not in claimed and not kept(name):
                            claimed.add(name)  # another uploader of this run sees it too
                            key, blob, new = await self._encode(
                                reader, snapshot, previous, chunk, name, data, bases, target)
                            await target.store.put(key, blob)
                            if key == fmt.block_key(name):
                                whole.add(name)
                            job.new_bytes += new
                            stored += len(blob)
                    done += 1
                    if time.monotonic() - reported >= PROGRESS_EVERY:
                        reported = time.monotonic()
                        job.progress = round(min(done / len(chunks), 0.999), 3)
                        job.stored = stored
                        await self.catalog.put_backup_job(job)

            await together([uploader() for _ in range(WINDOW)])
        volume_key = None
        if volume.encryption is not None:
            volume_key = await self._volume_key(volume, target)
        job.bytes = sum(min(CHUNK_SIZE, snapshot.size - c * CHUNK_SIZE) for c in blocks)
        job.stored = stored
        manifest = fmt.manifest(job.id, volume.name, volume.id, snapshot.name,
                                snapshot.created, snapshot.size, volume.fs, blocks,
                                previous.id, volume_key, bases)
        await target.store.put(fmt.manifest_key(job.id),
                               target.codec.encode_json(fmt.MANIFEST_MAGIC, job.id, manifest))
        job.state, job.progress, job.finished = BackupState.COMPLETE, 1.0, time.time()
        summary = summary_of(job, snapshot, previous.id, len(blocks))
        await target.store.put(fmt.summary_key(job.id),  # the commit point
                               target.codec.encode_json(fmt.SUMMARY_MAGIC, job.id, summary))
        await self.catalog.put_backup_job(job)
        self._mine.discard(job.id)
        old = await self._record_done(volume.name, job, snapshot, own)
        if old is not None and old.own:
            with contextlib.suppress(CargoholdError):  # no longer needed for incrementals
                await self.snapshots.remove(volume.name, old.snapshot)
        log.info("backup %s of %s complete: %d chunks read, %d bytes new, %d stored",
                 job.id, volume.name, len(chunks), job.new_bytes, stored)

    async def _encode(self, reader: DataClient, snapshot: Snapshot, previous: Previous,
                      chunk: int, name: str, data: bytes, bases: dict[str, str],
                      target: Target) -> tuple[str, bytes, int]:
        """(key, object, new bytes) of a block the target lacks: a delta against the
        chunk's block in the previous backup when few 4 KiB pieces changed (read from the
        previous backup's snapshot, kept for this), else the whole block."""
        old = previous.blocks.get(chunk)
        if previous.snapshot_id and old is not None and fmt.depth(old, bases) < fmt.MAX_CHAIN:
            before = await reader.read_snapshot(snapshot.volume_id, SNAPSHOT_READS,
                                                previous.snapshot_id, chunk * CHUNK_SIZE,
                                                len(data))
            if len(before) == len(data):
                pieces = [i for i in range(-(-len(data) // fmt.PIECE))
                          if before[i * fmt.PIECE:(i + 1) * fmt.PIECE]
                          != data[i * fmt.PIECE:(i + 1) * fmt.PIECE]]
                if len(pieces) <= fmt.BLOCK // fmt.PIECE // 2:
                    bases[name] = old
                    blob = await asyncio.to_thread(target.codec.encode_delta, name, old, data,
                                                   pieces)
                    return fmt.delta_key(name, old), blob, len(pieces) * fmt.PIECE
        _, blob = await asyncio.to_thread(target.codec.encode_block, data)
        return fmt.block_key(name), blob, len(data)

    async def content(self, name: str, bases: dict[str, str], target: Target) -> bytes:
        """Block ``name``'s bytes, its hash checked (a delta: applied to its base's)."""
        if name not in bases:
            return await asyncio.to_thread(target.codec.decode_block, name,
                                           await target.store.get(fmt.block_key(name)))
        blob = await target.store.get(fmt.delta_key(name, bases[name]))
        base, pieces = await asyncio.to_thread(target.codec.decode_delta, name, blob)
        if base != bases[name]:
            raise BackupCorrupt(what=f"block {name}", detail="its delta names another base "
                                "than the manifest")
        return await asyncio.to_thread(target.codec.apply, name,
                                       await self.content(base, bases, target), pieces)

    async def _changes(self, volume: Volume, snapshot: Snapshot,
                       target: Target) -> tuple[Previous, list[int]]:
        """The previous backup to build on (if its snapshot is still kept) and the chunks
        to read: those written since its snapshot, else all that hold data."""
        base = volume.backup_base
        since = ""
        previous = Previous("", {}, {}, "")
        if base is not None:
            kept = await self.catalog.find_snapshot(volume.name, base.snapshot)
            if kept is not None and kept.id == base.snapshot_id and \
                    kept.state is SnapshotState.READY:
                try:
                    found = await self.manifest(base.backup, target)
                    previous = Previous(base.backup, fmt.blocks_of(found, base.backup),
                                        fmt.bases_of(found, base.backup), base.snapshot_id)
                    since = base.snapshot_id
                except (BackupNotFound, BackupCorrupt) as e:
                    log.warning("backup of %s: the previous one (%s) is unusable, reading "
                                "everything: %s", volume.name, base.backup, e)
        async with self._reader(snapshot) as reader:
            chunks = await reader.snapshot_diff(snapshot.volume_id, since, snapshot.id)
        return previous, sorted(chunks)

    @contextlib.asynccontextmanager
    async def _reader(self, snapshot: Snapshot) -> AsyncIterator[DataClient]:
        servers = {s.id: s for s in await self.catalog.servers()}
        async with contextlib.AsyncExitStack() as stack:
            yield await snapshot_reader(snapshot, servers, self.access, stack)

    async def _volume_key(self, volume: Volume, target: Target) -> bytes:
        """An encrypted volume's blocks are its ciphertext: its key goes with them, into the
        manifest, which is sealed only on an encrypted target."""
        if not target.codec.encrypted:
            raise InvalidArgument(what="backup target", detail=f"{volume.name} is encrypted: "
                                  "its backups hold its key, and this target is not "
                                  "encrypted (set one with --encryption-key-file)")
        assert self.access is not None and volume.encryption is not None
        return unwrap_key(self.access.key, volume.id, volume.encryption["key"])

    async def _record_last(self, name: str, job: BackupJob) -> None:
        def record(v: Volume) -> Volume:
            v.last_backup = LastBackup(id=job.id, state=job.state, started=job.started,
                                       finished=job.finished, snapshot=job.snapshot,
                                       bytes=job.bytes, new_bytes=job.new_bytes,
                                       error=job.error)
            return v

        with contextlib.suppress(CargoholdError):
            await self.catalog.update_volume(name, record)

    async def _record_done(self, name: str, job: BackupJob, snapshot: Snapshot,
                           own: bool) -> BackupBase | None:
        """Record the backup on the volume; return the base it replaces."""
        replaced: list[BackupBase | None] = [None]

        def record(v: Volume) -> Volume:
            replaced[0] = v.backup_base
            v.backup_base = BackupBase(backup=job.id, snapshot=snapshot.name,
                                       snapshot_id=snapshot.id, own=own)
            return v

        await self.catalog.update_volume(name, record)
        await self._record_last(name, job)
        old = replaced[0]
        return old if old is not None and old.snapshot_id != snapshot.id else None

    async def _fail(self, job: BackupJob, reason: str) -> None:
        self._mine.discard(job.id)
        job.state, job.error, job.finished = BackupState.FAILED, reason, time.time()
        with contextlib.suppress(CargoholdError):
            await self.catalog.put_backup_job(job)
        await self._record_last(job.volume, job)

    async def _alive(self, job: BackupJob) -> bool:
        if job.node == self.node:
            return job.id in self._mine
        return await self.catalog.node_alive(job.node)

    # -- what the target holds -----------------------------------------------------------

    async def listing(self, volume: str = "") -> list[dict[str, Any]]:
        """The complete backups (from the target), then those running or failed (from the
        jobs), oldest first."""
        async with self.open_target() as target:
            names = await target.store.names("index/")
            summaries = await asyncio.gather(*(self._summary(k.rpartition("/")[2], target)
                                               for k in names))
        found = [s for s in summaries if not volume or s["volume"] == volume]
        complete = {s["id"] for s in found}
        for job in await self.catalog.backup_jobs():
            if job.kind == "backup" and job.state is not BackupState.COMPLETE and (
                    job.id not in complete) and (not volume or job.volume == volume):
                found.append({"id": job.id, "volume": job.volume, "snapshot": job.snapshot,
                              "created": job.started, "state": job.state.value,
                              "progress": job.progress, "bytes": job.bytes,
                              "new_bytes": job.new_bytes, "stored": job.stored,
                              "error": job.error})
        return sorted(found, key=lambda s: s["created"])

    async def _summary(self, backup_id: str, target: Target) -> dict[str, Any]:
        blob = await target.store.find(fmt.summary_key(backup_id))
        if blob is None:
            raise BackupNotFound(id=backup_id)
        found: dict[str, Any] = target.codec.decode_json(fmt.SUMMARY_MAGIC, backup_id, blob,
                                                         f"backup {backup_id}'s summary")
        return found

    async def manifest(self, backup_id: str, target: Target) -> dict[str, Any]:
        """A complete backup's manifest (``BackupNotFound`` if it is not complete)."""
        await self._summary(backup_id, target)
        blob = await target.store.find(fmt.manifest_key(backup_id))
        if blob is None:
            raise BackupCorrupt(what=f"backup {backup_id}'s manifest", detail="missing")
        found: dict[str, Any] = target.codec.decode_json(fmt.MANIFEST_MAGIC, backup_id, blob,
                                                         f"backup {backup_id}'s manifest")
        return found

    async def inspect(self, backup_id: str) -> dict[str, Any]:
        async with self.open_target() as target:
            summary = await self._summary(backup_id, target)
            found = await self.manifest(backup_id, target)
        blocks = fmt.blocks_of(found, backup_id)
        return {**summary, "fs": found["fs"], "block_size": found["block_size"],
                "blocks": len(blocks), "encrypted_volume": found.get("volume_key") is not None}

    # -- removing ------------------------------------------------------------------------

    async def remove(self, backup_id: str, collect: bool = True) -> dict[str, Any]:
        """Remove a backup (its summary first: it is no longer complete), then collect
        the blocks nothing references any more. A failed backup's record goes too."""
        job = await self.catalog.backup_job(backup_id)
        if job is not None and job.state is BackupState.FAILED:
            await self.catalog.drop_backup_job(backup_id, job.volume)
            return {"deferred": False, "deleted": 0}
        if job is not None and job.state is BackupState.RUNNING and await self._alive(job):
            raise BackupRunning(name=job.volume, id=backup_id)
        async with self.open_target() as target:
            await self._summary(backup_id, target)
            await target.store.delete([fmt.summary_key(backup_id)])
            await target.store.delete([fmt.manifest_key(backup_id)])
        if job is not None:
            await self.catalog.drop_backup_job(backup_id, job.volume)
        log.info("backup %s removed", backup_id)
        return await self.collect() if collect else {"deferred": True, "deleted": 0}

    async def collect(self, wait: float = COLLECT_WAIT) -> dict[str, Any]:
        """Delete the blocks no complete backup references, once no backup runs (waiting
        up to ``wait`` seconds; else the controller does it later)."""
        store = self.catalog.store
        await store.put(COLLECT_PENDING_KEY, b"1")
        if self._collecting:
            return {"deferred": True, "deleted": 0}  # one at a time; it covers this one
        self._collecting = True
        asked = await store.get(COLLECT_PENDING_KEY)  # a later ask changes its revision
        await store.put(COLLECTING_KEY, self.node.encode())
        try:
            deadline = time.monotonic() + wait
            while await self._running_backups():
                if time.monotonic() >= deadline:
                    log.info("collection of backup blocks waits for running backups: left "
                             "to the controller")
                    return {"deferred": True, "deleted": 0}
                await asyncio.sleep(_POLL)
            async with self.open_target() as target:
                whole: set[str] = set()  # blocks referenced, stored whole
                deltas: set[str] = set()  # and as deltas
                for key in await target.store.names("index/"):
                    backup_id = key.rpartition("/")[2]
                    found = await self.manifest(backup_id, target)
                    bases = fmt.bases_of(found, backup_id)
                    for name in set(fmt.blocks_of(found, backup_id).values()):
                        while name in bases:
                            deltas.add(f"{name}.{bases[name]}")
                            name = bases[name]
                        whole.add(name)
                stored = await target.store.names("blocks/") + await target.store.names(
                    "deltas/")
                doomed = [k for k in stored if k.rpartition("/")[2] not in (
                    deltas if k.startswith("deltas/") else whole)]
                manifests = {k.rpartition("/")[2] for k in await target.store.names("manifests/")}
                complete = {k.rpartition("/")[2] for k in await target.store.names("index/")}
                orphans = [fmt.manifest_key(m) for m in manifests - complete
                           if not await self._job_running(m)]
                await target.store.delete(doomed + orphans)
            if asked is not None:  # done, unless asked again since (the controller goes on)
                await store.txn([Compare.revision(COLLECT_PENDING_KEY, asked.mod_revision)],
                                [Delete(COLLECT_PENDING_KEY)])
            log.info("backup collection: %d blocks deleted, %d kept", len(doomed),
                     len(stored) - len(doomed))
            return {"deferred": False, "deleted": len(doomed), "kept": len(stored) - len(doomed)}
        finally:
            self._collecting = False
            await store.delete(COLLECTING_KEY)

    async def collect_pending(self) -> None:
        """The controller's turn: a collection left pending runs once no backup runs."""
        if await self.catalog.store.get(COLLECT_PENDING_KEY) is None:
            return
        if await self._running_backups():
            return
        with contextlib.suppress(CargoholdError):
            await self.collect(wait=0.0)

    async def _running_backups(self) -> list[str]:
        return [j.id for j in await self.catalog.backup_jobs()
                if j.kind == "backup" and j.state is BackupState.RUNNING and await self._alive(j)]

    async def _job_running(self, job_id: str) -> bool:
        job = await self.catalog.backup_job(job_id)
        return job is not None and job.state is BackupState.RUNNING

    async def _wait_for_collection(self) -> None:
        while (kv := await self.catalog.store.get(COLLECTING_KEY)) is not None:
            collector = kv.value.decode()
            if not (self._collecting if collector == self.node
                    else await self.catalog.node_alive(collector)):
                await self.catalog.store.delete(COLLECTING_KEY)  # its node stopped
                continue
            await asyncio.sleep(_POLL)


@dataclass
class Previous:
    """The backup an incremental builds on."""

    id: str  # "" : none
    blocks: dict[int, str]
    bases: dict[str, str]  # its deltas' bases
    snapshot_id: str  # the snapshot it was taken from (still kept)


def summary_of(job: BackupJob, snapshot: Snapshot, parent: str, blocks: int) -> dict[str, Any]:
    return {"id": job.id, "volume": job.volume, "volume_id": snapshot.volume_id,
            "snapshot": snapshot.name, "created": job.started, "finished": job.finished,
            "state": BackupState.COMPLETE.value, "size": snapshot.size, "bytes": job.bytes,
            "new_bytes": job.new_bytes, "stored": job.stored, "blocks": blocks,
            "parent": parent}


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


#: What the target's key is wrapped for (a fixed 16-byte id: it belongs to no volume).
_KEY_ID = "00" * 15 + "b0"
