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
