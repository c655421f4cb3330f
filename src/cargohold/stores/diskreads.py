"""Reads of files that would wait for the disk, done off an event loop.

A data server serves every volume it holds from one event loop: a read that misses the page
cache must not hold up the others while the disk answers. ``DiskReads`` takes such a read
and calls back on the loop with its bytes. The compiled pool (``_diskreads.c``) reads in
threads that never take the GIL and hands completions over through an eventfd the loop
watches, a batch at a time; Python threads are the reference and the fallback (each read
then costs ~70 us of CPU, mostly the GIL passing back and forth with the loop).
``CARGOHOLD_COMPILED=0`` in the environment chooses the Python path (``core/compiled.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from cargohold.core import compiled

try:
    from cargohold.stores import _diskreads  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - built by setup.py where a C compiler is
    _diskreads = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: What a read gives its callback: the bytes (fewer at the end of the file) or the error.
Done = Callable[[bytes | OSError], None]


def compiled_default() -> bool:
    return _diskreads is not None and compiled.wanted()


def _pread(fd: int, offset: int, length: int) -> bytes:
    chunks = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class DiskReads:
    """``read(fd, offset, length, done)``: ``done`` is called on the loop with the result."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int,
                 compiled: bool | None = None) -> None:
        self.compiled = compiled_default() if compiled is None else compiled
        if self.compiled and _diskreads is None:
            raise RuntimeError("cargohold.stores._diskreads is not built")
        self._loop = loop
        self._closed = False
        if self.compiled:
            self._pool = _diskreads.Pool(threads)
            loop.add_reader(self._pool.fileno(), self._collect)
        else:
            self._threads = ThreadPoolExecutor(threads, thread_name_prefix="read")

    @property
    def pending(self) -> int:
        """Reads submitted whose callback has not run yet (compiled pool only: 0 otherwise)."""
        return int(self._pool.pending) if self.compiled else 0

    def read(self, fd: int, offset: int, length: int, done: Done) -> None:
        if self._closed:
            raise ValueError("closed")
        if self.compiled:
            self._pool.submit(fd, offset, length, done)
            return
        future = self._threads.submit(_pread, fd, offset, length)
        future.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._deliver, f,
                                                                           done))

    def _deliver(self, future: Future[bytes], done: Done) -> None:
        if self._closed or future.cancelled():
            return
        error = future.exception()
        if error is None:
            done(future.result())
        elif isinstance(error, OSError):
            done(error)
        else:  # pragma: no cover - _pread raises nothing else
            raise error

    def _collect(self) -> None:
        for done, result in self._pool.completed():
            try:
                done(result)
            except Exception:  # the batch's other reads are answered all the same
                log.exception("a read's callback failed")

    def close(self) -> None:
        """Stop; reads not answered yet never are."""
        if self._closed:
            return
        self._closed = True
        if self.compiled:
            self._loop.remove_reader(self._pool.fileno())
            self._pool.close()
        else:
            self._threads.shutdown(wait=True, cancel_futures=True)
