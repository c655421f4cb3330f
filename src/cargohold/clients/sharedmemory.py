"""Write buffers an engine shares with the data servers on its own host.

A large write used to cross the host four times as a copy after FUSE handed it over: into a
``bytes`` of its own, into each data server's socket, and out of each socket again. The
engine now reads FUSE requests into slots of one memory file (``memfd``). A data server on
the same host maps that file read-only (``Op.SHARE``, over its unix socket), and a WRITE of
a large payload names where the payload lies in it instead of carrying it
(``Op.WRITE_SHARED``): the data server writes to its disk straight from the mapping.

A slot is in use while anyone may still read it. Its reader (the FUSE session) holds it
until the write it carries is answered; every data client that named it holds it until that
data server has answered the request. A connection that fails first keeps its hold: that
data server may still have the request queued, so the slot is retired instead of being
reused under it, until the client's next connection to that server SHAREs again and the
server answers that it aborted the old one (nothing left in it is read any more).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import secrets

from cargohold.core.wire import TOKEN_SIZE
from cargohold.errors import InvalidArgument

#: Slots: as many large writes as the engine keeps in flight at once
#: (the kernel sends at most ``MAX_BACKGROUND`` asynchronous requests), and a few more.
SLOTS = 48


class SharedMemory:
    """A memory file cut into equal slots, each reused once nobody holds it."""

    def __init__(self, slot_size: int, slots: int = SLOTS) -> None:
        if slot_size <= 0 or slots <= 0:
            raise ValueError("slot_size and slots must be positive")
        self.slot_size = slot_size
        self.size = slot_size * slots  # the slots; the file ends with the token's page
        self.fd = os.memfd_create("cargohold-writes", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size + mmap.PAGESIZE)
            # Its size is final: a data server that mapped it can never fault on a page
            # the file lost (SIGBUS), whatever this process does (the server checks the seal).
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(self.fd, self.size + mmap.PAGESIZE)
        except OSError:
            os.close(self.fd)
            raise
        #: The file's last bytes: a server that maps ``path`` checks it found this file.
        self.token = secrets.token_bytes(TOKEN_SIZE)
        self._map[-TOKEN_SIZE:] = self.token
        self._view = memoryview(self._map)
        self._holds = [0] * slots
        self._free = list(range(slots - 1, -1, -1))
        #: The path another process on this host opens the file by (as root).
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"

    def take(self) -> int | None:
        """A free slot, held once by the caller; None if every slot is in use."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._holds[slot] = 1
        return slot

    def slot(self, slot: int) -> memoryview:
        start = slot * self.slot_size
        return self._view[start:start + self.slot_size]

    def hold(self, at: int) -> int:
        """One more holder of the slot that byte ``at`` lies in; returns the slot."""
        slot = at // self.slot_size
        self._holds[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """One holder is done with ``slot``; the last one makes it free again."""
        holds = self._holds[slot] - 1
        self._holds[slot] = holds
        if holds == 0:
            self._free.append(slot)

    def held_elsewhere(self, slot: int) -> bool:
        """Someone besides the one who took ``slot`` holds it (a data client, for a request
        not answered yet, or retired with its connection)."""
        return self._holds[slot] > 1

    @property
    def free(self) -> int:
        return len(self._free)

    def close(self) -> None:
        """Unmap and close the file; slots still referenced keep the mapping (GC frees it)."""
        try:
            self._view.release()
            self._map.close()
        except BufferError:  # a slot view is still alive somewhere: unmapped when it dies
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SlotWindow:
    """Slots of a ``SharedMemory`` side by side at addresses that stay: place ``k`` shows
    slot ``slots[k]`` until ``show`` puts another slot there (MAP_FIXED over the same
    addresses). FUSE over io_uring fills buffers at addresses given once; this lets their
    pages be shared slots, and a slot that must not be written any more (a data server may
    still read it: ``DataClient`` retired it) leaves the window without the addresses
    changing. The window holds none of the slots itself: its user takes and releases them."""

    def __init__(self, shared: SharedMemory, slots: list[int]) -> None:
        self.shared = shared
        self.slots = list(slots)
        size = shared.slot_size
        # reserves the addresses; every page of it is replaced by a slot's below
        self._region = mmap.mmap(-1, len(slots) * size, flags=mmap.MAP_PRIVATE)
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self._region)
        self._base = ctypes.addressof(self._anchor)
        self.view = memoryview(self._region)
        for k, slot in enumerate(slots):
            self.show(k, slot)

    def show(self, place: int, slot: int) -> None:
        """Map slot ``slot`` at place ``place`` (OSError if the kernel refuses)."""
        size = self.shared.slot_size
        if not 0 <= place < len(self.slots):
            raise ValueError(f"no place {place} in a window of {len(self.slots)}")
        if self.shared.fd < 0:
            raise ValueError("the shared write buffers are closed")
        address = _libc.mmap(ctypes.c_void_p(self._base + place * size), size,
                             mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED,
                             self.shared.fd, ctypes.c_long(slot * size))
        if address != self._base + place * size:
            err = ctypes.get_errno()
            raise OSError(err, f"mapping a shared slot: {os.strerror(err)}")
        self.slots[place] = slot

    def close(self) -> None:
        """Unmap the window (every slot's pages stay in the file); while a view into it is
        still alive somewhere, it is unmapped when that dies."""
        self._anchor = None
        try:
            self.view.release()
            self._region.close()
        except BufferError:
            pass


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10


def map_sealed(path: str, token: bytes) -> mmap.mmap:
    """Map another process's write buffers (``path``: its /proc/PID/fd/N) read-only, once
    checked: a memory file sealed against shrinking (no page of the mapping can go away: a
    SIGBUS would kill the server), ending with ``token``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(what="SHARE", detail=f"{path}: {exc.strerror}") from None
    try:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:  # not a memory file
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise InvalidArgument(what="SHARE", detail=f"{path} is not sealed against "
                                  "shrinking (a memfd with F_SEAL_SHRINK)")
        size = os.fstat(fd).st_size
        if size == 0:
            raise InvalidArgument(what="SHARE", detail=f"{path} is empty")
        shared = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except OSError as exc:
        raise InvalidArgument(what="SHARE", detail=f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if shared[size - len(token):] != token:
        shared.close()
        raise InvalidArgument(what="SHARE", detail=f"{path} is not the client's file")
    return shared
