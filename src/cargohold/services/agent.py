"""The agent: attaches volumes on this host and detaches them.

attach = claim the volume with a new epoch → start its engine (FUSE) → loop device →
mkfs on first use → mount. ``attach(name, filesystem=False)`` stops at the loop device (raw
block access: no mkfs, no mount; the attachment has no mount point). detach walks the same
steps backwards. ``expand`` makes an attachment follow a volume that grew (engine → loop
device → file system, online). Every step leaves a trace
on disk (the engine's directory, its pid file, the mount point), so an agent that crashed
finds what it left when it starts again (:meth:`Agent.recover`) and either adopts a healthy
attachment or removes every piece of a broken one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cargohold.clients import kernel
from cargohold.config import ENGINE_MODULES, RESIZE_SIGNAL, EngineConfig, TlsFiles
from cargohold.core import placement
from cargohold.core.capability import SNAPSHOT_READS, Capability
from cargohold.core.cipher import unwrap_key
from cargohold.core.iostats import VolumeIo
from cargohold.core.models import Attachment, Locality, ServerState, Volume, VolumeState
from cargohold.errors import (
    AttachFailed,
    CargoholdError,
    DetachFailed,
    ExpandFailed,
    HostCommandFailed,
    NotLocal,
    VolumeBusy,
    VolumeDemoted,
    VolumeInUse,
)
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

ENGINE_START_TIMEOUT = 20.0
ENGINE_STOP_TIMEOUT = 20.0
ENGINE_RESIZE_TIMEOUT = 20.0


class EngineDir:
    """Where one volume's engine keeps its traces on this host."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.root = state_dir / "engines" / name
        self.fuse = self.root / "fuse"
        self.file = self.fuse / "volume"
        self.pid_file = self.root / "engine.pid"
        self.ready_file = self.root / "ready.json"
        self.capability_file = self.root / "capability.json"
        self.log_file = self.root / "engine.log"
        self.stats_file = self.root / "stats.json"
        self.mountpoint = state_dir / "mounts" / name

    def pid(self) -> int:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return 0


class Agent:
    def __init__(self, catalog: Catalog, node: str, state_dir: Path, metadata_url: str,
                 heal_rate: float = 0.0, scrub_rate: float = 0.0, tls: TlsFiles | None = None,
                 cluster_key: bytes = b"", lease_ttl: float = 0.0,
                 etcd_password_file: Path | None = None, engine_metrics: bool = False
                 ) -> None:
        """``heal_rate``: bytes per second an engine may use to bring a replica back;
        ``scrub_rate``: to scrub its volume. ``tls``: the files engines connect to other
        hosts with (None: plaintext); ``cluster_key``: signs each engine's capability
        (empty: engines get none, for data servers that ask for none); ``lease_ttl``: engines
        fail all I/O once the node's lease is lost (0: never, as on one host);
        ``engine_metrics``: engines count requests for ``engine_io``."""
        self.lease_ttl = lease_ttl
        self.engine_metrics = engine_metrics
        self.etcd_password_file = etcd_password_file
        self.catalog = catalog
        self.tls = tls
        self._cluster_key = cluster_key
        self.heal_rate = heal_rate
        self.scrub_rate = scrub_rate
        self.node = node
        self.state_dir = state_dir
        self.metadata_url = metadata_url
        self._locks: dict[str, asyncio.Lock] = {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- attach --------------------------------------------------------------------------

    async def attach(self, name: str, filesystem: bool = True) -> Volume:
        """Attach ``name`` here; mount its file system unless ``filesystem`` is False.

        Without the file system the attachment ends at the loop device
        (``attachment.device``), which is never formatted. A volume attached here the other
        way is refused (detach it first).
        """
        async with self._lock(name):
            volume = await self.catalog.volume(name)
            att = volume.attachment
            if att is not None and att.node == self.node and volume.state is VolumeState.ATTACHED:
                if await asyncio.to_thread(self._healthy, name, att):
                    if filesystem != bool(att.mountpoint):
                        raise VolumeInUse(name=name, node=self.node)  # the other way
                    return volume  # attaching twice on one host gives the same attachment
            if volume.locality is Locality.STRICT:
                await self._check_local(volume)
            down = await self._owner_down(volume)
            volume = await self.catalog.update_volume(name, lambda v: self._claim(v, down))
            assert volume.attachment is not None
            step = "start engine"
            try:
                pid = await self._start_engine(volume)
                step = "loop device"
                paths = EngineDir(self.state_dir, name)
                device = await asyncio.to_thread(kernel.attach_loop, str(paths.file))
                if filesystem:
                    step = "format"
                    if not volume.formatted:
                        await self._format(volume, device)
                    step = "mount"
                    found = await asyncio.to_thread(kernel.probe_filesystem, device)
                    if found != volume.fs:
                        raise AttachFailed(name=name, step=step, detail=f"expected {volume.fs}, "
                                           f"found {found or 'none'}")
                    await asyncio.to_thread(kernel.mount, device, str(paths.mountpoint),
                                            volume.fs)
                    if volume.formatted:  # it may have grown while detached: catch up
                        await self._grow_filesystem(volume, device, str(paths.mountpoint))
            except (CargoholdError, OSError) as e:
                detail = e.message if isinstance(e, CargoholdError) else str(e)
                log.error("attach of %s failed at %s: %s", name, step, detail)
                await self._teardown(name, lazy=True)
                await self.catalog.update_volume(name, _released(f"attach failed at {step}: "
                                                                 f"{detail}"))
                if isinstance(e, AttachFailed):
                    raise
                raise AttachFailed(name=name, step=step, detail=detail) from e
            epoch = volume.attachment.epoch

            def attached(v: Volume) -> Volume:
                if v.attachment is None or v.attachment.epoch != epoch:
                    raise VolumeBusy(name=name, state="taken over")
                v.state = VolumeState.ATTACHED
                v.attachment.mountpoint = str(paths.mountpoint) if filesystem else ""
                v.attachment.device = device
                v.attachment.engine_pid = pid
                return v

            volume = await self.catalog.update_volume(name, attached)
            log.info("attached %s at epoch %d (%s)", name, epoch,
                     volume.attachment.mountpoint or volume.attachment.device
                     if volume.attachment else "?")
            return volume

    async def _check_local(self, volume: Volume) -> None:
        """``NotLocal`` unless a replica of ``volume`` is on this node or one of its data
        servers can take one (the controller then moves one here)."""
        servers = {s.id: s for s in await self.catalog.servers()}
        if placement.holds_replica_on(volume, servers, self.node):
            return
        if not any(s.node == self.node and s.state is ServerState.UP
                   for s in servers.values()):
            raise NotLocal(name=volume.name, node=self.node)

    async def _owner_down(self, volume: Volume) -> str:
        """The other node holding ``volume`` if its lease has expired (it is down), else ''."""
        att = volume.attachment
        if att is None or att.node == self.node or await self.catalog.node_alive(att.node):
            return ""
        return att.node

    def _claim(self, volume: Volume, down: str) -> Volume:
        """Claim ``volume`` for this node with a new epoch (a metadata CAS step).

        A volume attached on another node is taken over only when that node is ``down``
        (its lease expired): its engine, if it still runs somewhere, is fenced off by the
        data servers as soon as our engine presents the new epoch.
        """
        if volume.state in (VolumeState.CREATING, VolumeState.DELETING):
            raise VolumeBusy(name=volume.name, state=volume.state.value)
        if volume.standby:
            raise VolumeBusy(name=volume.name, state=f"a standby following the backups of "
                             f"{volume.standby} ('cargohold volume activate {volume.name}' "
                             "to use it)")
        if volume.restoring:
            raise VolumeBusy(name=volume.name, state=f"being restored from backup "
                             f"{volume.restoring}")
        if volume.replica_of is not None:
            raise VolumeBusy(name=volume.name, state=f"a standby of volume "
                             f"{volume.replica_of.volume} of another cluster ('cargohold "
                             f"volume promote {volume.name}' to use it)")
        if volume.fenced_by:
            raise VolumeDemoted(name=volume.name, why=volume.fenced_by)
        if volume.attachment is not None:
            if volume.attachment.node != self.node:
                if volume.attachment.node != down:
                    raise VolumeInUse(name=volume.name, node=volume.attachment.node)
                log.warning("taking over %s from node %s (its lease expired), epoch %d",
                            volume.name, down, volume.epoch + 1)
            elif volume.state is not VolumeState.ATTACHED:
                raise VolumeBusy(name=volume.name, state=volume.state.value)
            # attached here but broken (engine gone): take it over with a fresh epoch
        volume.epoch += 1
        volume.state = VolumeState.ATTACHING
        volume.attachment = Attachment(node=self.node, epoch=volume.epoch)
        volume.last_error = ""
        return volume

    async def _start_engine(self, volume: Volume) -> int:
        assert volume.attachment is not None
        paths = EngineDir(self.state_dir, volume.name)
        await self._teardown(volume.name, lazy=True)  # leftovers of a broken attachment
        paths.fuse.mkdir(parents=True, exist_ok=True)
        paths.ready_file.unlink(missing_ok=True)
        capability_file = None
        if self._cluster_key:
            capability_file = paths.capability_file
            self._write_capability(capability_file, volume)
        elif volume.encryption is not None:
            raise AttachFailed(name=volume.name, step="start engine",
                               detail="the volume is encrypted and this node has no cluster "
                                      "key to open its key (--insecure-plaintext)")
        argv = EngineConfig(metadata=self.metadata_url, volume=volume.name,
                            epoch=volume.attachment.epoch, node=self.node,
                            mountpoint=paths.fuse, ready_file=paths.ready_file,
                            heal_rate=self.heal_rate, scrub_rate=self.scrub_rate,
                            tls=self.tls, capability_file=capability_file,
                            lease_ttl=self.lease_ttl,
                            etcd_password_file=self.etcd_password_file,
                            stats_file=paths.stats_file if self.engine_metrics else None
                            ).argv()
        with open(paths.log_file, "ab") as log_out:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._children[child.pid] = child
        paths.pid_file.write_text(str(child.pid))
        deadline = time.monotonic() + ENGINE_START_TIMEOUT
        while not paths.ready_file.exists():
            if child.poll() is not None:
                raise AttachFailed(name=volume.name, step="start engine",
                                   detail=f"engine exited: {_tail(paths.log_file)}")
            if time.monotonic() > deadline:
                raise AttachFailed(name=volume.name, step="start engine",
                                   detail="engine did not become ready")
            await asyncio.sleep(0.02)
        return child.pid

    def _write_capability(self, path: Path, volume: Volume) -> None:
        """The engine's permission for its attachment's I/O (and, for a clone still
        filling, to read its source's snapshots), and the key of an encrypted volume, for
        root only: it gets these, not the cluster key, so it can use no other epoch and open
        no other volume."""
        assert volume.attachment is not None
        epoch = volume.attachment.epoch
        signed = Capability(volume.id, epoch, self.node).sign(self._cluster_key)
        held = {"volume_id": volume.id, "epoch": epoch, "node": self.node,
                "capability": signed.hex()}
        if volume.origin is not None:  # a clone filling reads its source's snapshot
            held["origin"] = {"volume_id": volume.origin.volume_id, "capability": Capability(
                volume.origin.volume_id, SNAPSHOT_READS, self.node).sign(
                    self._cluster_key).hex()}
        if volume.encryption is not None:
            held["key"] = unwrap_key(self._cluster_key, volume.id,
                                     volume.encryption["key"]).hex()
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(held, f)

    async def _format(self, volume: Volume, device: str) -> None:
        found = await asyncio.to_thread(kernel.probe_filesystem, device)
        if found and found != volume.fs:
            raise AttachFailed(name=volume.name, step="format",
                               detail=f"device holds {found}, not {volume.fs}; refusing to "
                                      f"overwrite it")
        if not found:
            await asyncio.to_thread(kernel.make_filesystem, device, volume.fs, volume.name)

        def formatted(v: Volume) -> Volume:
            v.formatted = True
            return v

        await self.catalog.update_volume(volume.name, formatted)

    def _healthy(self, name: str, att: Attachment) -> bool:
        paths = EngineDir(self.state_dir, name)
        if not (self._alive(att.engine_pid) and kernel.is_mounted(str(paths.fuse))):
            return False
        if att.mountpoint:
            return kernel.is_mounted(str(paths.mountpoint))
        return att.device in kernel.loops_backed_by(str(paths.file))  # raw block attachment

    # -- expand (after the volume grew) ---------------------------------------------------

    async def _grow_filesystem(self, volume: Volume, device: str, mountpoint: str) -> None:
        """Grow the file system to fill the device; a failure is logged, not raised (the
        volume is usable, and 'cargohold volume resize' again finishes the grow)."""
        try:
            await asyncio.to_thread(kernel.grow_filesystem, volume.fs, device, mountpoint)
        except (HostCommandFailed, OSError) as e:
            log.warning("volume %s is attached, but its file system did not grow to %d bytes: "
                        "%s", volume.name, volume.size, e)

    async def expand(self, name: str) -> Volume:
        """Make the attachment of ``name`` here use the volume's recorded size.

        After ``VolumeService.resize``: the engine is told (``RESIZE_SIGNAL``; it re-reads
        the record and drops the kernel's cached attributes of its FUSE file) and the agent
        waits until ``stat`` of that file shows the new size → ``losetup --set-capacity`` on
        the loop device → the file system is grown online (resize2fs for ext4, xfs_growfs
        for xfs; a raw block attachment stops at the loop device). Every step is a no-op
        when already done, so a failed expand is finished by calling it again. A volume that
        is not attached returns unchanged (the next attach uses the new size).
        """
        async with self._lock(name):
            volume = await self.catalog.volume(name)
            att = volume.attachment
            if att is None:
                return volume
            if att.node != self.node:
                raise ExpandFailed(name=name, step="attachment", node=att.node,
                                   detail=f"it is attached on node {att.node!r}, not here")
            if volume.state is not VolumeState.ATTACHED:
                raise VolumeBusy(name=name, state=volume.state.value)
            paths = EngineDir(self.state_dir, name)
            step = "engine"
            try:
                await self._resize_engine(volume, att, paths)
                step = "loop device"
                size = await asyncio.to_thread(kernel.refresh_loop, att.device)
                if size != volume.size:
                    raise ExpandFailed(name=name, step=step, node=self.node,
                                       detail=f"{att.device} is {size} bytes, not {volume.size}")
                if att.mountpoint:
                    step = "grow file system"
                    await asyncio.to_thread(kernel.grow_filesystem, volume.fs, att.device,
                                            att.mountpoint)
            except (HostCommandFailed, OSError) as e:
                log.error("expand of %s failed at %s: %s", name, step, e)
                raise ExpandFailed(name=name, step=step, node=self.node, detail=str(e)) from e
            log.info("volume %s attached here now has %d bytes", name, volume.size)
            return volume

    async def _resize_engine(self, volume: Volume, att: Attachment, paths: EngineDir) -> None:
        """Signal the engine and wait until its FUSE file has the volume's size."""
        size = await self._file_size(volume, paths)
        if size == volume.size:
            return
        if size > volume.size:
            raise ExpandFailed(name=volume.name, step="engine", node=self.node,
                               detail=f"the engine serves {size} bytes, more than the "
                                      f"{volume.size} recorded")
        if not self._alive(att.engine_pid):
            raise ExpandFailed(name=volume.name, step="engine", node=self.node,
                               detail="the engine is not running")
        os.kill(att.engine_pid, RESIZE_SIGNAL)
        deadline = time.monotonic() + ENGINE_RESIZE_TIMEOUT
        while size < volume.size:
            if not self._alive(att.engine_pid) or time.monotonic() > deadline:
                raise ExpandFailed(name=volume.name, step="engine", node=self.node,
                                   detail=f"the engine did not take the new size: "
                                          f"{_tail(paths.log_file)}")
            await asyncio.sleep(0.02)
            size = await self._file_size(volume, paths)

    async def _file_size(self, volume: Volume, paths: EngineDir) -> int:
        """Size of the engine's FUSE file. A stat the engine does not answer (it is stuck or
        stopped) blocks in the kernel: give up on it after a while (the thread stays parked
        until the engine answers or goes)."""
        try:
            stat = await asyncio.wait_for(asyncio.to_thread(os.stat, paths.file),
                                          ENGINE_RESIZE_TIMEOUT)
        except TimeoutError:
            raise ExpandFailed(name=volume.name, step="engine", node=self.node,
                               detail=f"the engine did not answer within "
                                      f"{ENGINE_RESIZE_TIMEOUT:g} s") from None
        return stat.st_size

    # -- detach --------------------------------------------------------------------------

    async def detach(self, name: str) -> Volume:
        async with self._lock(name):
            volume = await self.catalog.volume(name)
            if volume.attachment is None:
                return volume
            if volume.attachment.node != self.node:
                raise VolumeInUse(name=name, node=volume.attachment.node)

            def detaching(v: Volume) -> Volume:
                if v.attachment is None or v.attachment.node != self.node:
                    raise VolumeBusy(name=name, state=v.state.value)
                v.state = VolumeState.DETACHING
                return v

            await self.catalog.update_volume(name, detaching)
            try:
                await self._teardown(name, lazy=False)
            except (HostCommandFailed, OSError) as e:
                log.error("detach of %s failed: %s", name, e)
                failure = f"detach failed: {e}"

                def still_attached(v: Volume) -> Volume:
                    v.state = VolumeState.ATTACHED
                    v.last_error = failure
                    return v

                await self.catalog.update_volume(name, still_attached)
                raise DetachFailed(name=name, step="unmount", detail=str(e)) from e
            log.info("detached %s", name)
            return await self.catalog.update_volume(name, _released(""))

    async def detach_all(self) -> None:
        """Detach every volume attached on this host (the node is stopping)."""
        for volume in await self.catalog.volumes():
            if volume.attachment is not None and volume.attachment.node == self.node:
                try:
                    await self.detach(volume.name)
                except CargoholdError as e:
                    log.error("%s", e)

    async def _teardown(self, name: str, lazy: bool) -> None:
        """Remove every piece of an attachment on this host, in reverse order.

        The mount is undone first (``lazy`` only when nothing can be using it, after a failed
        attach); a busy mount raises and leaves the rest in place.
        """
        paths = EngineDir(self.state_dir, name)
        if await asyncio.to_thread(kernel.is_mounted, str(paths.mountpoint)):
            await asyncio.to_thread(kernel.unmount, str(paths.mountpoint), lazy)
        if paths.mountpoint.exists():
            paths.mountpoint.rmdir()
        for device in await asyncio.to_thread(kernel.loops_backed_by, str(paths.file)):
            await asyncio.to_thread(kernel.detach_loop, device)
        await self._stop_engine(paths.pid())
        if await asyncio.to_thread(kernel.is_mounted, str(paths.fuse)):
            await asyncio.to_thread(kernel.unmount, str(paths.fuse), True)
        if paths.root.exists():
            shutil.rmtree(paths.fuse, ignore_errors=True)
            paths.pid_file.unlink(missing_ok=True)
            paths.capability_file.unlink(missing_ok=True)
            paths.ready_file.unlink(missing_ok=True)
            paths.stats_file.unlink(missing_ok=True)

    async def _stop_engine(self, pid: int) -> None:
        if not pid or not self._alive(pid):
            return
        os.kill(pid, signal.SIGTERM)  # the engine flushes every replica, then unmounts FUSE
        deadline = time.monotonic() + ENGINE_STOP_TIMEOUT
        while self._alive(pid):
            if time.monotonic() > deadline:
                log.error("engine %d did not stop; killing it", pid)
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.02)
        self._children.pop(pid, None)

    def _alive(self, pid: int) -> bool:
        if not pid:
            return False
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return any(m.encode() in argv for m in ENGINE_MODULES) and state != "Z"

    # -- recovery after a crash of the agent ----------------------------------------------

    async def recover(self) -> list[str]:
        """Adopt healthy attachments of this host, clean broken ones; return what was done."""
        report = []
        attached_here = set()
        for volume in await self.catalog.volumes():
            att = volume.attachment
            if att is None or att.node != self.node:
                continue
            attached_here.add(volume.name)
            if volume.state is VolumeState.ATTACHED and await asyncio.to_thread(
                    self._healthy, volume.name, att):
                report.append(f"adopted {volume.name} (engine {att.engine_pid})")
                continue
            try:
                await self._teardown(volume.name, lazy=True)
            except (HostCommandFailed, OSError) as e:
                report.append(f"could not clean {volume.name}: {e}")
                continue
            await self.catalog.update_volume(volume.name, _released(
                f"the node restarted while the volume was {volume.state.value}; "
                f"the attachment was cleaned up"))
            report.append(f"cleaned {volume.name} (was {volume.state.value})")
        engines = self.state_dir / "engines"
        for leftover in sorted(engines.iterdir()) if engines.exists() else []:
            if leftover.name not in attached_here:
                await self._teardown(leftover.name, lazy=True)
                shutil.rmtree(leftover, ignore_errors=True)
                report.append(f"removed leftovers of {leftover.name}")
        for line in report:
            log.info("recovery: %s", line)
        return report

    def engine_io(self) -> dict[str, VolumeIo]:
        """The request counts of the engines running on this host, by volume name (as of
        their last stats file: at most 2 s old)."""
        found: dict[str, VolumeIo] = {}
        engines = self.state_dir / "engines"
        for root in sorted(engines.iterdir()) if engines.exists() else []:
            paths = EngineDir(self.state_dir, root.name)
            try:
                data = json.loads(paths.stats_file.read_text())
                if data["pid"] != paths.pid() or not self._alive(data["pid"]):
                    continue  # a previous engine's
                found[root.name] = VolumeIo.from_dict(data["io"], float(data["time"]))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: %s", paths.stats_file, e)
        return found

    def engine_log(self, name: str) -> str:
        return _tail(EngineDir(self.state_dir, name).log_file, 4000)


def _released(error: str) -> Callable[[Volume], Volume]:
    def release(volume: Volume) -> Volume:
        volume.state = VolumeState.DETACHED
        volume.attachment = None
        volume.last_error = error
        return volume

    return release


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-5:])[-limit:]

