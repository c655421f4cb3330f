"""An encrypted volume's data path: what the FUSE file reads and writes, encrypted on the
way to the replica set and decrypted on the way back (``core/cipher.py``).

Everything below this layer (replicas, catch-up copies, scrubs, reconciling, the data
servers) sees ciphertext only and moves it as it is. Writes the kernel sends are whole 4 KiB
blocks (the loop device's sector size); a write of part of a block is read, decrypted,
changed and written back whole. A write whose data lies in the engine's own shared buffer
is encrypted where it lies, so the data servers on this host map ciphertext.

Requests of 64 KiB or more are encrypted or decrypted in a worker thread (the compiled
cipher releases the GIL), so that the event loop serves other requests meanwhile: AES-256
runs at ~3 GB/s on one core here, as much CPU per MiB as the rest of the engine's work.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from cargohold.core.cipher import BLOCK, VolumeCipher
from cargohold.core.wire import BytesLike
from cargohold.services.engine.fuse import BlockTarget

#: Requests at least this big are encrypted and decrypted in the worker thread.
LARGE = 64 << 10


class EncryptedTarget:
    """A ``BlockTarget`` over another (the replica set) that holds ciphertext only."""

    def __init__(self, inner: BlockTarget, cipher: VolumeCipher) -> None:
        self.inner = inner
        self.cipher = cipher
        # one thread: the cipher's OpenSSL contexts are used by one thread at a time
        self._worker = (ThreadPoolExecutor(1, thread_name_prefix="cipher")
                        if cipher.compiled else None)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def _large(self, length: int) -> bool:
        return self._worker is not None and length >= LARGE

    @property
    def size(self) -> int:
        return self.inner.size

    def read_at_once(self, offset: int, length: int, into: memoryview | None = None
                     ) -> BytesLike | None:
        if offset % BLOCK or length % BLOCK or self._large(length):
            return None  # a large one is decrypted in the worker: start_read
        data = self.inner.read_at_once(offset, length, into)  # a buffer of our own: in place
        return None if data is None else self.cipher.decrypt(offset // BLOCK, data, True)

    def start_read(self, offset: int, length: int) -> asyncio.Future[BytesLike]:
        start = offset - offset % BLOCK
        end = -(-(offset + length) // BLOCK) * BLOCK
        if self._large(end - start):
            return asyncio.ensure_future(self._read_large(start, offset - start, length,
                                                          end - start))
        sealed = self.inner.start_read(start, end - start)
        done: asyncio.Future[BytesLike] = sealed.get_loop().create_future()
        sealed.add_done_callback(partial(self._opened, done, start, offset - start, length))
        return done

    def _opened(self, done: asyncio.Future[BytesLike], start: int, skip: int, length: int,
                sealed: asyncio.Future[BytesLike]) -> None:
        if done.cancelled():
            return
        if sealed.cancelled():
            done.cancel()
        elif (error := sealed.exception()) is not None:
            done.set_exception(error)
        else:
            try:
                plain = self.cipher.decrypt(start // BLOCK, sealed.result(), True)
            except Exception as e:  # noqa: BLE001 - the reader gets it as its error
                done.set_exception(e)
                return
            done.set_result(plain if skip == 0 and len(plain) == length
                            else plain[skip:skip + length])

    async def _read_large(self, start: int, skip: int, length: int, span: int) -> BytesLike:
        sealed = self.inner.read_at_once(start, span)
        if sealed is None:
            sealed = await self.inner.start_read(start, span)
        plain: BytesLike = await asyncio.get_running_loop().run_in_executor(
            self._worker, self.cipher.decrypt, start // BLOCK, sealed, True)
        return plain if skip == 0 and len(plain) == length else plain[skip:skip + length]

    def start_write(self, offset: int, data: BytesLike, shared_at: int = -1
                    ) -> asyncio.Future[None]:
        if offset % BLOCK or len(data) % BLOCK:
            return asyncio.ensure_future(self._write_part(offset, data))
        view = memoryview(data)
        if self._large(len(view)):
            return asyncio.ensure_future(self._write_large(offset, view, shared_at))
        if shared_at >= 0 and not view.readonly:
            self.cipher.encrypt(offset // BLOCK, view, view)  # our own buffer: in place
            return self.inner.start_write(offset, view, shared_at)
        return self.inner.start_write(offset, self.cipher.encrypt(offset // BLOCK, view))  # type: ignore[arg-type]

    async def _write_large(self, offset: int, view: memoryview, shared_at: int) -> None:
        loop = asyncio.get_running_loop()
        if shared_at >= 0 and not view.readonly:
            await loop.run_in_executor(self._worker, self.cipher.encrypt, offset // BLOCK, view,
                                       view)
            await self.inner.start_write(offset, view, shared_at)
            return
        sealed = await loop.run_in_executor(self._worker, self.cipher.encrypt, offset // BLOCK,
                                            view)
        await self.inner.start_write(offset, sealed)  # type: ignore[arg-type]

    async def _write_part(self, offset: int, data: BytesLike) -> None:
        """Read, decrypt, change and write back the whole blocks a write touches."""
        start = offset - offset % BLOCK
        end = -(-(offset + len(data)) // BLOCK) * BLOCK
        blocks = bytearray(await self.start_read(start, end - start))
        blocks[offset - start:offset - start + len(data)] = data
        await self.start_write(start, blocks)

    async def flush(self) -> None:
        await self.inner.flush()

    async def trim(self, offset: int, length: int) -> None:
        await self.inner.trim(offset, length)  # whole blocks become zeros: they read as zeros
