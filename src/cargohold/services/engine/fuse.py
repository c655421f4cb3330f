"""A FUSE session that exposes one volume as a single file, served from asyncio.

cargohold talks the FUSE kernel protocol (``linux/fuse.h``, 7.x) on ``/dev/fuse`` directly
instead of going through libfuse: the protocol for a one-file filesystem is small, and an
asyncio loop keeps as many requests in flight as the kernel sends (``max_background``),
which a synchronous libfuse loop cannot. The mount has a root directory holding one regular
file, ``volume``; the agent puts a loop device on that file.

The filesystem calls a :class:`BlockTarget` (the engine's replica set) for the data path.

Where the kernel offers it (Linux 6.14+, module parameter ``fuse.enable_uring``) and
``_fusering.c`` was built, requests come through FUSE over io_uring once INIT is answered:
ring entries the kernel fills, each answered with the fetch of its next request, the replies
of one loop turn submitted together. /dev/fuse then carries only what the ring does not
(forgets, interrupts); a kernel that refuses the ring leaves everything on /dev/fuse.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial
from time import perf_counter
from typing import Any, Protocol

from cargohold.clients.sharedmemory import SharedMemory, SlotWindow
from cargohold.core import compiled
from cargohold.core.iostats import OpStats, VolumeIo
from cargohold.core.wire import BytesLike
from cargohold.errors import CargoholdError, NoSpace

try:
    from cargohold.services.engine import _fusering  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - not built: /dev/fuse only
    _fusering = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FILE_NAME = b"volume"
ROOT_INO = 1
FILE_INO = 2

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
ZERO_WINDOW = 8  # writes of zeros in flight for one FALLOC_FL_ZERO_RANGE
MAX_BACKGROUND = 64
READ_BUFFER = MAX_WRITE + 64 * 1024
SHARED_WRITE = 64 * 1024  # writes at least this big go to local data servers shared

# opcodes (linux/fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, GETXATTR, LISTXATTR, FLUSH, INIT = 20, 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS = 27, 28, 29, 30, 34
INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE = 36, 38, 42, 43

# INIT flags we ask for
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_ASYNC_DIO = 1 << 15
FUSE_MAX_PAGES = 1 << 22
FUSE_INIT_EXT = 1 << 30  # flags2 is there (and in the reply)
FUSE_OVER_IO_URING = 1 << 41  # of flags | flags2 << 32
WANTED_FLAGS = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES

#: FUSE over io_uring: the kernel's switch, and ring entries in all (split among its queues,
#: one per possible CPU; a request waits for an entry of the queue of the CPU it came from)
URING_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
RING_ENTRIES = MAX_BACKGROUND
SPARE_SLOTS = 16  # shared write buffers left for slots moved out of the ring (``_own_slot``)

# notifications the file system sends the kernel unasked (linux/fuse.h, fuse_notify_code)
NOTIFY_INVAL_INODE = 2

FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FATTR_SIZE = 1 << 3

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
IN_HEAD = struct.Struct("<IIQQ")  # the part of IN_HEADER the request loop looks at
IO_IN_HEAD = struct.Struct("<QQI")  # fh offset size: how READ_IN and WRITE_IN both begin
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... flags2 unused[7]
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsec nsec
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
READ_IN = struct.Struct("<QQII")  # fh offset size read_flags
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")  # size padding
WRITE_REPLY = struct.Struct("<IiQII")  # OUT_HEADER + WRITE_OUT: one buffer, one write()
SETATTR_IN_VALID = struct.Struct("<IIQQ")  # valid padding fh size
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino off len (off < 0: attributes only)
KSTATFS = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")  # ino off namelen type

ATTR_TTL = 3600  # the file's attributes change only on resize, which re-announces them

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2


class BlockTarget(Protocol):
    """What the FUSE file reads from and writes to: the engine's replica set.

    Reads and writes return futures (no coroutine per request: the replies are sent from
    their done callbacks), except reads the target can answer at once (``read_at_once``:
    None means it cannot; given ``into``, it may read there and return ``into`` itself);
    flushes and trims are rare and may be coroutines.
    """

    @property
    def size(self) -> int: ...

    def read_at_once(self, offset: int, length: int, into: memoryview | None = None
                     ) -> BytesLike | None: ...
    def start_read(self, offset: int, length: int) -> asyncio.Future[BytesLike]: ...
    def start_write(self, offset: int, data: BytesLike, shared_at: int = -1
                    ) -> asyncio.Future[None]: ...
    async def flush(self) -> None: ...
    async def trim(self, offset: int, length: int) -> None: ...


def mount(fd: int, mountpoint: str) -> None:
    # allow_other: the loop device is set up by root, but a container's processes may run as
    # anyone; default_permissions: the kernel checks the file's mode (0600, root), so no
    # other local user can open the volume's image.
    options = (f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,"
               "default_permissions").encode()
    if _libc.mount(b"cargohold", mountpoint.encode(), b"fuse.cargohold",
                   MS_NOSUID | MS_NODEV, options) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount of FUSE file system on {mountpoint}: {os.strerror(err)}")


def ring_wanted() -> bool:
    """FUSE over io_uring is built, allowed (``CARGOHOLD_COMPILED``) and enabled here."""
    if _fusering is None or not compiled.wanted():
        return False
    try:
        with open(URING_PARAMETER) as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


def ring_shape() -> tuple[int, int]:
    """Queues of FUSE over io_uring (one per possible CPU) and ring entries per queue."""
    queues = possible_cpus()
    return queues, max(2, -(-RING_ENTRIES // queues))


def ring_slots() -> int:
    """Shared write buffers the ring takes, spares included, where it is used; else 0."""
    if not ring_wanted():
        return 0
    queues, per_queue = ring_shape()
    return queues * per_queue + SPARE_SLOTS


def possible_cpus() -> int:
    """The kernel's queues of FUSE over io_uring: one per possible CPU."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        count = 0
        for part in text.split(","):  # "0-1", "0,2-5"
            first, _, last = part.partition("-")
            count += int(last or first) - int(first) + 1
        return count
    except (OSError, ValueError):
        return os.cpu_count() or 1


def unmount(mountpoint: str, lazy: bool = False) -> None:
    if _libc.umount2(mountpoint.encode(), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}")


#: Seconds during which the same I/O failure is counted rather than logged again.
QUIET_FOR = 10.0


class FuseSession:
    """Serves one mounted FUSE connection until it is unmounted."""

    def __init__(self, target: BlockTarget, mountpoint: str,
                 shared: SharedMemory | None = None, io: VolumeIo | None = None) -> None:
        """``io``: count every request and its latency there (None: do not)."""
        self.target = target
        self.io = io
        self.mountpoint = mountpoint
        self.fd = -1
        self.finished: asyncio.Future[None] | None = None
        # Requests are read into a slot of the write buffers shared with the data servers
        # when one is free: a large WRITE then keeps its slot and goes out without a copy
        # (``SharedMemory``). Otherwise into a buffer of our own, reused for every request.
        if shared is not None and shared.slot_size < READ_BUFFER:
            raise ValueError(f"shared slots of {shared.slot_size} bytes cannot hold a request "
                             f"({READ_BUFFER})")
        self._shared = shared
        self._own = memoryview(bytearray(READ_BUFFER))
        self._slot = -1
        self._buffer = self._own
        self._iov = [self._buffer]
        self._next_buffer()
        # FUSE over io_uring (``_start_ring``): requests that came through it carry the tag
        # ``~entry`` (below 0) instead of their unique, and are answered through the ring
        self._ring: Any = None
        self._window: SlotWindow | None = None  # entry k's payload: the window's place k
        self._ring_views: list[memoryview] = []
        self._ring_submit: asyncio.Handle | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._io: set[asyncio.Future[Any]] = set()  # reads and writes being served
        self._started = time.time()
        self.on_error: Callable[[BaseException], Awaitable[None]] | None = None
        # the same failure again and again (every I/O once fenced or the lease is lost) is
        # logged once per QUIET_FOR seconds, with a count of the ones not logged
        self._said = ""
        self._said_until = 0.0
        self._unsaid = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Mount and begin answering the kernel (the INIT handshake arrives first)."""
        loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            mount(self.fd, self.mountpoint)
        except OSError:
            os.close(self.fd)
            self.fd = -1
            raise
        loop.add_reader(self.fd, self._on_readable)

    async def wait_closed(self) -> None:
        assert self.finished is not None
        await self.finished

    async def drain(self) -> None:
        """Wait until every request already received has been answered."""
        while self._tasks or self._io:
            await asyncio.gather(*self._tasks, *self._io, return_exceptions=True)

    def close(self) -> None:
        """Close our end of the FUSE connection (the kernel ended it, or would not)."""
        self._stop_ring()
        if self.fd >= 0:
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    def resized(self) -> None:
        """Make the kernel forget the file's cached attributes after ``target.size`` grew.

        The attributes are cached for ``ATTR_TTL``; FUSE_NOTIFY_INVAL_INODE drops them, so
        the next ``stat`` asks again (GETATTR) and the kernel's idea of the file size, which
        ``losetup --set-capacity`` reads, becomes the new size. A kernel that has not looked
        the file up yet has nothing cached (ENOENT): fine.
        """
        if self.fd < 0:
            return
        body = NOTIFY_INVAL_INODE_OUT.pack(FILE_INO, -1, 0)
        header = OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE, 0)
        try:
            os.writev(self.fd, [header, body])
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise

    @property
    def transport(self) -> str:
        """How requests arrive: "io_uring" or "/dev/fuse"."""
        return "io_uring" if self._ring is not None else "/dev/fuse"

    # -- FUSE over io_uring --------------------------------------------------------------

    def _start_ring(self) -> None:
        """Hand ring entries to the kernel (after INIT agreed on FUSE_OVER_IO_URING); from
        then on requests arrive there. A refusal leaves them on /dev/fuse.

        Each entry's payload buffer is a slot of the write buffers shared with the data
        servers (seen through a ``SlotWindow``), held by the ring: a large WRITE goes to
        them from where the kernel put it. Before an entry is answered (and so filled again)
        its slot must be the ring's alone; one a data client still holds moves out of the
        window first (``_own_slot``)."""
        assert _fusering is not None
        shared = self._shared
        queues, per_queue = ring_shape()
        count = queues * per_queue
        if shared is None or shared.free < count + SPARE_SLOTS:
            log.warning("FUSE over io_uring needs %d free shared write buffers: requests "
                        "come through /dev/fuse", count + SPARE_SLOTS)
            return
        slots = [shared.take() for _ in range(count)]
        window = ring = None
        try:
            window = SlotWindow(shared, slots)  # type: ignore[arg-type]
            ring = _fusering.Ring(self.fd, queues, per_queue, shared.slot_size, window.view)
            ring.register()
        except (OSError, ValueError) as e:
            log.warning("FUSE over io_uring refused (%s): requests come through /dev/fuse", e)
            if ring is not None:
                ring.close()
            if window is not None:
                window.close()
            for slot in slots:
                shared.release(slot)  # type: ignore[arg-type]
            return
        self._ring, self._window = ring, window
        size = shared.slot_size
        self._ring_views = [window.view[k * size:(k + 1) * size] for k in range(count)]
        asyncio.get_running_loop().add_reader(ring.fd, self._on_ring)
        log.info("FUSE requests through io_uring: %d ring entries on %d queues", count, queues)

    def _stop_ring(self) -> None:
        ring, self._ring = self._ring, None
        window, self._window = self._window, None
        if ring is None or window is None:
            return
        if self._ring_submit is not None:
            self._ring_submit.cancel()
            self._ring_submit = None
        asyncio.get_running_loop().remove_reader(ring.fd)
        ring.close()  # its entries' commands are cancelled
        self._ring_views = []
        window.close()
        for slot in window.slots:
            window.shared.release(slot)

    def _own_slot(self, entry: int) -> bool:
        """Make entry ``entry``'s slot the ring's alone, moving in a free one if a data client
        still holds it (its server may yet read it); False if that cannot be done now."""
        window = self._window
        assert window is not None
        shared, slot = window.shared, window.slots[entry]
        if not shared.held_elsewhere(slot):
            return True
        fresh = shared.take()
        if fresh is None:
            return False
        try:
            window.show(entry, fresh)
        except OSError as e:
            log.error("moving a shared write buffer out of the FUSE ring failed: %s", e)
            shared.release(fresh)
            return False
        shared.release(slot)  # free again once its other holders let go
        return True

    def _on_ring(self) -> None:
        ring = self._ring
        if ring is None:
            return
        requests = ring.take()
        for entry, opcode, _unique, nodeid, offset, size in requests:  # answered by entry
            tag = ~entry
            if opcode < 0:  # a reply the kernel refused (a bug of ours): the entry is gone
                log.error("FUSE ring entry %d refused: %s", entry, os.strerror(-opcode))
            elif opcode == WRITE:
                data = self._ring_views[entry][:size]
                window = self._window
                if size < SHARED_WRITE or window is None:
                    self._write(tag, offset, bytes(data))
                else:  # the data servers on this host read it where the kernel put it
                    self._write(tag, offset, data, -1,
                                window.slots[entry] * window.shared.slot_size)
            elif opcode == READ:
                self._read(tag, offset, size)
            elif opcode == LOOKUP:  # the name is in the payload (the first argument is empty)
                self._dispatch(opcode, tag, nodeid,
                               self._ring_views[entry][:ring.request_size(entry)])
            else:
                self._dispatch(opcode, tag, nodeid, memoryview(ring.op_in(entry)))
        if ring.ended:  # unmounted or aborted: /dev/fuse says so too (ENODEV)
            self._stop_ring()

    def _ring_reply(self, entry: int, error: int, payload: BytesLike, in_place: int = 0
                    ) -> None:
        """Answer ring entry ``entry``: ``error`` (an errno), or ``payload``, or the
        ``in_place`` bytes already in its payload buffer."""
        ring = self._ring
        if ring is None:
            return  # the ring was closed: nobody waits for the answer any more
        try:
            if not self._own_slot(entry):  # answered once its buffer can be the ring's
                log.warning("no free shared write buffer to answer a FUSE request with; "
                            "trying again")
                asyncio.get_running_loop().call_later(
                    0.01, self._ring_reply, entry, error, payload, in_place)
                return
            if error or in_place:
                ring.reply(entry, -error, in_place)
            else:
                ring.reply_data(entry, payload)
        except (OSError, ValueError) as e:
            log.error("replying to FUSE through io_uring failed: %s", e)
            return
        if self._ring_submit is None:  # every reply of this loop turn, in one system call
            self._ring_submit = asyncio.get_running_loop().call_soon(self._submit_ring)

    def _submit_ring(self) -> None:
        self._ring_submit = None
        if self._ring is None:
            return
        try:
            self._ring.submit()
        except OSError as e:
            log.error("replying to FUSE through io_uring failed: %s", e)

    # -- request loop --------------------------------------------------------------------

    def _next_buffer(self) -> None:
        """Read the next requests into a free shared slot, else into our own buffer."""
        shared = self._shared
        slot = shared.take() if shared is not None else None
        if shared is None or slot is None:
            self._slot, self._buffer = -1, self._own
        else:
            self._slot, self._buffer = slot, shared.slot(slot)
        self._iov = [self._buffer]

    def _on_readable(self) -> None:
        if self._slot < 0 and self._shared is not None and self._shared.free:
            self._next_buffer()  # slots were all in use last time; one is free again
        fd, iov, view = self.fd, self._iov, self._buffer
        for _ in range(64):  # take what is queued, then let replies and replicas run
            try:
                n = os.readv(fd, iov)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT):  # ENOENT: request was interrupted
                    continue
                if e.errno != errno.ENODEV:
                    log.error("reading /dev/fuse failed: %s", e)
                self.close()  # ENODEV: the file system was unmounted
                return
            if n < IN_HEADER.size:
                continue
            length, opcode, unique, nodeid = IN_HEAD.unpack_from(view)
            # READ and WRITE are nearly all of the traffic: decoded here, in one step each
            if opcode == WRITE:
                offset, size = IO_IN_HEAD.unpack_from(view, IN_HEADER.size)[1:]
                start = IN_HEADER.size + WRITE_IN.size
                slot, shared = self._slot, self._shared
                if slot < 0 or shared is None or size < SHARED_WRITE:
                    self._write(unique, offset, bytes(view[start:start + size]))
                    continue
                # the request keeps the slot it was read into; the next goes to another
                data = view[start:start + size]
                self._next_buffer()
                iov, view = self._iov, self._buffer
                self._write(unique, offset, data, slot, slot * shared.slot_size + start)
            elif opcode == READ:
                offset, size = IO_IN_HEAD.unpack_from(view, IN_HEADER.size)[1:]
                self._read(unique, offset, size)
            else:
                self._dispatch(opcode, unique, nodeid, view[IN_HEADER.size:length])

    def _dispatch(self, opcode: int, unique: int, nodeid: int, body: memoryview) -> None:
        if opcode == READ:
            _fh, offset, size, _flags = READ_IN.unpack_from(body)
            self._read(unique, offset, size)
        elif opcode == WRITE:
            _fh, offset, size = WRITE_IN.unpack_from(body)[:3]
            self._write(unique, offset, bytes(body[WRITE_IN.size:WRITE_IN.size + size]))
        elif opcode in (FSYNC, FLUSH, FSYNCDIR):
            self._spawn(unique, self._flush(unique))
        elif opcode == FALLOCATE:
            self._spawn(unique, self._fallocate(unique, *FALLOCATE_IN.unpack_from(body)[1:4]))
        elif opcode in (FORGET, BATCH_FORGET, INTERRUPT):
            return  # no reply; requests finish fast, so interrupts are not worth honouring
        elif opcode == INIT:
            self._init(unique, body)
        elif opcode == LOOKUP:
            name = bytes(body).rstrip(b"\0")
            if nodeid == ROOT_INO and name == FILE_NAME:
                self._reply(unique, ENTRY_OUT_HEAD.pack(FILE_INO, 1, ATTR_TTL, ATTR_TTL, 0, 0)
                            + self._attr(FILE_INO))
            else:
                self._error(unique, errno.ENOENT)
        elif opcode in (GETATTR, SETATTR):
            if opcode == SETATTR:
                valid, _pad, _fh, size = SETATTR_IN_VALID.unpack_from(body)
                if valid & FATTR_SIZE and size != self.target.size:
                    self._error(unique, errno.EPERM)  # resizing goes through cargohold
                    return
            self._reply(unique, ATTR_OUT_HEAD.pack(ATTR_TTL, 0, 0) + self._attr(nodeid))
        elif opcode in (OPEN, OPENDIR):
            self._reply(unique, OPEN_OUT.pack(0, FOPEN_PARALLEL_DIRECT_WRITES, 0))
        elif opcode == READDIR:
            self._readdir(unique, body)
        elif opcode == STATFS:
            # no blocks: ``df`` (and node_exporter's file system collector) leave out file
            # systems of size 0 rather than list every attached volume's image as a full one
            # (the volume's own file system, on the loop device, is listed with its use)
            self._reply(unique, KSTATFS.pack(0, 0, 0, 2, 0, 4096, 255, 4096, 0))
        elif opcode in (RELEASE, RELEASEDIR, ACCESS):
            self._reply(unique, b"")
        elif opcode == DESTROY:
            self._reply(unique, b"")
        else:
            self._error(unique, errno.ENOSYS)

    def _spawn(self, unique: int, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- replies -------------------------------------------------------------------------

    def _reply(self, unique: int, payload: BytesLike) -> None:
        if unique < 0:
            self._ring_reply(~unique, 0, payload)
            return
        header = OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique)
        self._send([header, payload])

    def _error(self, unique: int, err: int) -> None:
        if unique < 0:
            self._ring_reply(~unique, err, b"")
            return
        self._send([OUT_HEADER.pack(OUT_HEADER.size, -err, unique)])

    def _send(self, parts: list[BytesLike]) -> None:
        if self.fd < 0:
            return
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            # ENOENT: the request was interrupted and the kernel no longer waits for it.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("replying to FUSE failed: %s", e)

    def _attr(self, ino: int) -> bytes:
        now = int(self._started)
        if ino == ROOT_INO:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o600, self.target.size, 1
        return ATTR.pack(ino, size, size // 512, now, now, now, 0, 0, 0,
                         mode, nlink, 0, 0, 0, 4096, 0)

    def _init(self, unique: int, body: memoryview) -> None:
        major, minor, max_readahead, flags, flags2 = INIT_IN.unpack_from(body)
        if major != 7:
            log.error("kernel speaks FUSE %d.%d, this engine needs 7.x", major, minor)
            self._error(unique, errno.EPROTO)
            return
        offered = flags | (flags2 << 32 if flags & FUSE_INIT_EXT else 0)
        wanted = WANTED_FLAGS
        if unique >= 0 and ring_wanted():
            wanted |= FUSE_INIT_EXT | FUSE_OVER_IO_URING
        agreed = offered & wanted
        self._reply(unique, INIT_OUT.pack(
            7, min(minor, 38), max_readahead, agreed & 0xFFFFFFFF,
            MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4, MAX_WRITE, 1, MAX_PAGES, 0, agreed >> 32))
        if agreed & FUSE_OVER_IO_URING:
            self._start_ring()

    def _readdir(self, unique: int, body: memoryview) -> None:
        _fh, offset, size, _flags = READ_IN.unpack_from(body)
        entries = [(ROOT_INO, b".", 4), (ROOT_INO, b"..", 4), (FILE_INO, FILE_NAME, 8)]
        out = bytearray()
        for index, (ino, name, kind) in enumerate(entries[offset:], start=offset + 1):
            record = DIRENT.pack(ino, index, len(name), kind) + name
            record += b"\0" * (-len(record) % 8)
            if len(out) + len(record) > size:
                break
            out += record
        self._reply(unique, bytes(out))

    # -- data path -----------------------------------------------------------------------

    def _read(self, unique: int, offset: int, size: int) -> None:
        size = max(0, min(size, self.target.size - offset))
        if size == 0:
            self._reply(unique, b"")
            return
        started = perf_counter()
        try:
            # through the ring: straight into the entry's payload, the reply's place
            into = self._ring_views[~unique][:size] if unique < 0 and self._ring_views else None
            data = self.target.read_at_once(offset, size, into)
            if data is not None:
                if data is into:
                    self._ring_reply(~unique, 0, b"", size)
                else:
                    self._reply(unique, data)
                if self.io is not None:
                    self.io.read.done(size, perf_counter() - started)
                return
            future = self.target.start_read(offset, size)
        except Exception as e:  # noqa: BLE001 - every failure must become an errno
            self._fail(unique, e, self.io.read if self.io else None, started)
            return
        self._io.add(future)
        future.add_done_callback(partial(self._read_done, unique, started))

    def _read_done(self, unique: int, started: float, future: asyncio.Future[BytesLike]
                   ) -> None:
        self._io.discard(future)
        error = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if error is not None:
            self._fail(unique, error, self.io.read if self.io else None, started)
            return
        data = future.result()
        self._reply(unique, data)
        if self.io is not None:
            self.io.read.done(len(data), perf_counter() - started)

    def _write(self, unique: int, offset: int, data: BytesLike, slot: int = -1,
               shared_at: int = -1) -> None:
        """Start a write; ``slot``: the shared slot ``data`` lies in (at ``shared_at``),
        held by this request until it is answered."""
        started = perf_counter()
        try:
            if offset + len(data) > self.target.size:
                self._error(unique, errno.ENOSPC)
                self._release(slot)
                return
            if shared_at >= 0:
                future = self.target.start_write(offset, data, shared_at)
            else:
                future = self.target.start_write(offset, data)
        except Exception as e:  # noqa: BLE001
            self._release(slot)
            self._fail(unique, e, self.io.write if self.io else None, started)
            return
        self._io.add(future)
        future.add_done_callback(partial(self._write_done, unique, len(data), slot, started))

    def _release(self, slot: int) -> None:
        if slot >= 0 and self._shared is not None:
            self._shared.release(slot)

    def _write_done(self, unique: int, size: int, slot: int, started: float,
                    future: asyncio.Future[None]) -> None:
        self._io.discard(future)
        self._release(slot)
        error = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if error is not None:
            self._fail(unique, error, self.io.write if self.io else None, started)
            return
        if unique < 0:
            self._ring_reply(~unique, 0, WRITE_OUT.pack(size, 0))
        elif self.fd >= 0:
            try:
                os.write(self.fd, WRITE_REPLY.pack(WRITE_REPLY.size, 0, unique, size, 0))
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENODEV):
                    log.error("replying to FUSE failed: %s", e)
        if self.io is not None:
            self.io.write.done(size, perf_counter() - started)

    async def _flush(self, unique: int) -> None:
        started = perf_counter()
        try:
            await self.target.flush()
        except Exception as e:  # noqa: BLE001
            self._fail(unique, e, self.io.flush if self.io else None, started)
            return
        self._reply(unique, b"")
        if self.io is not None:
            self.io.flush.done(0, perf_counter() - started)

    async def _fallocate(self, unique: int, offset: int, length: int, mode: int) -> None:
        if mode == 0 or mode == FALLOC_FL_KEEP_SIZE:
            self._reply(unique, b"")  # thin volumes allocate on write
            return
        if not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            self._error(unique, errno.EOPNOTSUPP)
            return
        length = max(0, min(length, self.target.size - offset))
        started = perf_counter()
        stats = None if self.io is None else (
            self.io.trim if mode & FALLOC_FL_PUNCH_HOLE else self.io.write)
        try:
            if mode & FALLOC_FL_PUNCH_HOLE:
                await self.target.trim(offset, length)
            else:
                await self._write_zeros(offset, length)
        except Exception as e:  # noqa: BLE001
            self._fail(unique, e, stats, started)
            return
        self._reply(unique, b"")
        if stats is not None:
            stats.done(length, perf_counter() - started)

    async def _write_zeros(self, offset: int, length: int) -> None:
        """Zero a range and keep it allocated (``FALLOC_FL_ZERO_RANGE``).

        Unlike a punched hole, the caller wants the space to stay there: the loop device
        sends this for a zero-out that must not unmap (``REQ_NOUNMAP``, e.g. mkfs zeroing
        the ext4 journal), so that later writes into the range cannot run out of space on a
        full data server. The zeros are written, ``ZERO_WINDOW`` pieces at a time.
        """
        zeros = bytes(min(length, MAX_WRITE))
        end = offset + length
        pending: list[asyncio.Future[None]] = []
        while offset < end:
            piece = min(len(zeros), end - offset)
            pending.append(self.target.start_write(offset, zeros[:piece] if piece < len(zeros)
                                                   else zeros))
            offset += piece
            if len(pending) >= ZERO_WINDOW or offset >= end:
                results = await asyncio.gather(*pending, return_exceptions=True)
                pending = []
                for result in results:
                    if isinstance(result, BaseException):
                        raise result

    def _fail(self, unique: int, error: BaseException, stats: OpStats | None = None,
              started: float = 0.0) -> None:
        """Answer ``unique`` with the errno for ``error``; count it in ``stats``."""
        if stats is not None:
            stats.failed(perf_counter() - started)
        code = errno.ENOSPC if isinstance(error, NoSpace) else errno.EIO
        if isinstance(error, CargoholdError):
            text, now = str(error), time.monotonic()
            if text == self._said and now < self._said_until:
                self._unsaid += 1
            else:
                if self._unsaid:
                    log.error("... and %d more I/O failures like it", self._unsaid)
                log.error("I/O failed: %s", error)
                self._said, self._said_until, self._unsaid = text, now + QUIET_FOR, 0
        else:
            log.exception("I/O failed", exc_info=error)
        self._error(unique, code)
        if self.on_error is not None:
            self._spawn(0, self.on_error(error))
