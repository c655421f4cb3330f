"""The engine's local read path: a replica on this host read straight from its files."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from cargohold.core.layout import BLOCK_SIZE
from cargohold.errors import (
    Fenced,
)

try:  # the same CRC-32 as zlib's, computed with SIMD instructions: ~3x faster per block
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is optional
    from zlib import crc32

from cargohold.stores.chunkstore import ZERO_BLOCK, BytesLike, check_volume_id
from cargohold.stores.diskstore import REPLICAS_DIR
from cargohold.stores.epochfile import EPOCH_BYTES, EPOCH_FILE, read_epoch_slots


class LocalReplicaReader:
    """Reads a replica on this host straight from its files, without its data server.

    The engine of a volume with a replica on its own host reads that copy here: a ``pread``
    and a checksum in the engine instead of a round trip through the data server. It answers
    only what it can vouch for, exactly as the data server would: blocks whose checksums
    match, and blocks never written (zeros). Anything else returns None and the caller asks
    the data server, which repairs, refuses or fences as usual:
    - a checksum that does not match (a corrupt block, or a write landing at this moment);
    - a range beyond the mapped size (the replica grew since: the engine reopens the reader);
    - a higher epoch in the replica's epoch file: the volume was attached elsewhere since,
      and the data server would refuse this engine (invariant 2 holds for reads too).

    Writes never come this way: they go through the data server, which fences them.

    A replica with snapshots keeps some blocks in ``extra`` (:mod:`cargohold.stores.versionmap`):
    where each lies is read from ``heads`` as of the data server's last flush (it writes the
    file then); a block moved since reads elsewhere than its checksum says, and is asked of
    the data server like any block that does not match.
    """

    def __init__(self, root: Path, volume_id: str, epoch: int) -> None:
        check_volume_id(volume_id)
        path = Path(root) / REPLICAS_DIR / volume_id
        self.epoch = epoch
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        try:
            self._data_fd = self._open(path / "data")
            epoch_fd = self._open(path / EPOCH_FILE)
            self._epoch_map = self._map(epoch_fd, EPOCH_BYTES)
            sums_fd = self._open(path / "sums")
            self._blocks = os.fstat(sums_fd).st_size // 4
            self._sums = memoryview(self._map(sums_fd, self._blocks * 4)).cast("I")
        except BaseException:
            self.close()
            raise
        self._epoch_seen = b""
        self._flags = os.RWF_NOWAIT
        self._path = path
        self._heads: memoryview | None = None  # the replica's heads, once it has snapshots
        self._extra_fd = -1
        if not self._still_ours():
            current = self._newest_epoch()
            self.close()
            raise Fenced(volume_id=volume_id, epoch=epoch, current=current)

    @property
    def size(self) -> int:
        return self._blocks * BLOCK_SIZE

    def _open(self, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._fds.append(fd)
        return fd

    def _map(self, fd: int, size: int) -> mmap.mmap:
        mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._maps.append(mapped)
        return mapped

    def _newest_epoch(self) -> int:
        slots = read_epoch_slots(self._epoch_map[:EPOCH_BYTES])
        return max((e for e in slots if e is not None), default=0)

    def _still_ours(self) -> bool:
        """Whether no newer attachment has fenced the replica (checked on every read: a
        compare of the epoch file's bytes, parsed only when they changed)."""
        current = self._epoch_map[:EPOCH_BYTES]
        if current == self._epoch_seen:
            return True
        if self._newest_epoch() > self.epoch:
            return False
        self._epoch_seen = current
        return True

    def read(self, offset: int, length: int, into: memoryview | None = None
             ) -> BytesLike | None:
        """The ``length`` bytes at ``offset`` (block aligned), or None: ask the data server.

        ``into``: a writable buffer of ``length`` bytes that the bytes read from the file go
        to; it is what is returned then (blocks never written may come as bytes of their own).
        """
        first = offset // BLOCK_SIZE
        count = length // BLOCK_SIZE
        if first + count > self._blocks or not self._still_ours():
            return None
        heads = self._heads
        if heads is not None:
            if count == 1:
                place = heads[2 * first]
                if place:
                    return self._read_slot(first, place)
            elif any(heads[2 * first:2 * (first + count):2]):
                return self._read_moved(first, count)
        if count == 1:  # the common small read, without lists
            want = self._sums[first]
            if not want:
                return ZERO_BLOCK
            data = self._cached(offset, length, into=into)
            if data is not None and (crc32(data) or 1) == want:
                return data
            if self._heads is None and self._map_heads():
                return self.read(offset, length, into)
            return None
        stored = self._sums[first : first + count].tolist()
        if not any(stored):
            return bytes(length)
        data = self._cached(offset, length, into=into)
        if data is None:
            return None
        view = memoryview(data)
        for k, want in enumerate(stored):
            block = view[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE]
            if (crc32(block) or 1) != want if want else block != ZERO_BLOCK:
                if self._heads is None and self._map_heads():
                    return self.read(offset, length, into)
                return None
        return data

    def _map_heads(self) -> bool:
        """Map the replica's heads and extra once it has them (its first snapshot)."""
        if not (self._path / "snapshots.json").exists():
            return False
        try:
            heads_fd = self._open(self._path / "heads")
            self._extra_fd = self._open(self._path / "extra")
            if os.fstat(heads_fd).st_size < self._blocks * 8:
                return False
            self._heads = memoryview(self._map(heads_fd, self._blocks * 8)).cast("I")
        except (OSError, ValueError):
            return False
        return True

    def _read_slot(self, block: int, place: int) -> BytesLike | None:
        """One block that lies in extra (or nowhere: ask the data server)."""
        want = self._sums[block]
        if not want:
            return ZERO_BLOCK
        if place == 0xFFFFFFFF:
            return None
        data = self._cached((place - 1) * BLOCK_SIZE, BLOCK_SIZE, self._extra_fd)
        return data if data is not None and (crc32(data) or 1) == want else None

    def _read_moved(self, first: int, count: int) -> BytesLike | None:
        """Blocks some of which lie in extra, block by block (checksums decide)."""
        assert self._heads is not None
        out = bytearray()
        for i in range(first, first + count):
            want, place = self._sums[i], self._heads[2 * i]
            if not want:
                out += ZERO_BLOCK
                continue
            if place == 0:
                data = self._cached(i * BLOCK_SIZE, BLOCK_SIZE)
            elif place == 0xFFFFFFFF:
                return None
            else:
                data = self._cached((place - 1) * BLOCK_SIZE, BLOCK_SIZE, self._extra_fd)
            if data is None or (crc32(data) or 1) != want:
                return None
            out += data
        return out

    def _cached(self, offset: int, length: int, fd: int = -1,
                into: memoryview | None = None) -> bytearray | memoryview | None:
        """The bytes if the page cache holds them all (read into ``into`` if given); None
        rather than wait for the disk (the engine's event loop must not block: its data
        server reads a miss instead)."""
        data = bytearray(length) if into is None else into
        try:
            done = os.preadv(self._data_fd if fd < 0 else fd, [data], offset, self._flags)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP or not self._flags:
                return None  # the data server reads it, and says what is wrong
            self._flags = 0  # a file system without RWF_NOWAIT (tmpfs: never waits anyway)
            return self._cached(offset, length, fd, into)
        return data if done == length else None

    def close(self) -> None:
        if hasattr(self, "_sums"):
            self._sums.release()
        if getattr(self, "_heads", None) is not None:
            self._heads.release()  # type: ignore[union-attr]
        for mapped in self._maps:
            mapped.close()
        for fd in self._fds:
            os.close(fd)
        self._maps, self._fds = [], []
