"""Reads off the event loop (stores/diskreads.py): the compiled pool and the Python threads
give the same answers; the C is run once more built with AddressSanitizer and
UndefinedBehaviorSanitizer."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cargohold.core import compiled
from cargohold.stores import diskreads
from cargohold.stores.diskreads import DiskReads
from tests import sanitizers

SOURCE = Path(diskreads.__file__).with_name("_diskreads.c")
WAYS = [pytest.param(True, id="compiled"), pytest.param(False, id="python")]


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, bytes]:
    content = os.urandom(3 << 20)
    path = tmp_path / "data"
    path.write_bytes(content)
    return path, content


async def read_all(reads: DiskReads, fd: int,
                   asks: list[tuple[int, int]]) -> list[bytes | OSError]:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in asks]
    for (offset, length), future in zip(asks, futures, strict=True):
        reads.read(fd, offset, length, future.set_result)
    return list(await asyncio.wait_for(asyncio.gather(*futures), 10))


def test_the_compiled_pool_is_built_and_used_unless_the_flag_says() -> None:
    assert diskreads._diskreads is not None  # pip install -e . builds stores/_diskreads.c
    assert diskreads.compiled_default() == compiled.wanted()  # CARGOHOLD_COMPILED=0: no


@pytest.mark.parametrize("compiled", WAYS)
def test_reads_answer_with_the_files_bytes_on_the_loop(compiled: bool,
                                                       data: tuple[Path, bytes]) -> None:
    path, content = data
    rng = random.Random(7)
    asks = [(rng.randrange(len(content)), rng.choice([1, 4096, 65536, 1 << 20]))
            for _ in range(300)]
    asks += [(len(content) - 100, 4096), (len(content), 4096)]  # short at the end, empty

    async def body() -> None:
        reads = DiskReads(asyncio.get_running_loop(), 4, compiled=compiled)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = await read_all(reads, fd, asks)
            assert got == [content[o:o + n] for o, n in asks]
            assert reads.pending == 0
        finally:
            reads.close()
            os.close(fd)

    asyncio.run(body())


@pytest.mark.parametrize("compiled", WAYS)
def test_a_read_that_fails_answers_with_its_error(compiled: bool, tmp_path: Path) -> None:
    async def body() -> None:
        reads = DiskReads(asyncio.get_running_loop(), 2, compiled=compiled)
        directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        closed = os.open(tmp_path, os.O_RDONLY)
        os.close(closed)
        try:
            [is_dir, bad_fd] = await read_all(reads, directory, [(0, 10)]) + \
                await read_all(reads, closed, [(0, 10)])
            assert isinstance(is_dir, IsADirectoryError)
            assert isinstance(bad_fd, OSError) and bad_fd.errno == 9
        finally:
            reads.close()
            os.close(directory)

    asyncio.run(body())


@pytest.mark.parametrize("compiled", WAYS)
def test_closed_with_reads_in_flight_it_answers_none_of_them(
        compiled: bool, data: tuple[Path, bytes]) -> None:
    path, _ = data

    async def body() -> None:
        reads = DiskReads(asyncio.get_running_loop(), 2, compiled=compiled)
        fd = os.open(path, os.O_RDONLY)
        answered: list[object] = []
        try:
            for offset in range(0, 3 << 20, 4096):
                reads.read(fd, offset, 4096, answered.append)
            reads.close()
            reads.close()
            count = len(answered)
            await asyncio.sleep(0.2)
            assert len(answered) == count  # nothing after the close
            with pytest.raises(ValueError):
                reads.read(fd, 0, 1, answered.append)
        finally:
            os.close(fd)

    asyncio.run(body())


def test_the_compiled_pool_refuses_what_it_cannot_read() -> None:
    from cargohold.stores._diskreads import Pool  # type: ignore[import-not-found]

    with pytest.raises(ValueError):
        Pool(0)
    pool = Pool(1)
    try:
        for args in ((-1, 0, 1), (0, -1, 1), (0, 0, 0), (0, 0, (64 << 20) + 1)):
            with pytest.raises(ValueError):
                pool.submit(*args, None)
        with pytest.raises(TypeError):
            pool.submit("0", 0, 1, None)
    finally:
        pool.close()


#: Run under the sanitizers: reads of every size, errors, a close with reads queued, a pool
#: dropped without a close.
EXERCISE = """
import os, select, sys
sys.path.insert(0, sys.argv[1])
from _diskreads import Pool
path = sys.argv[2]
content = open(path, "rb").read()
fd = os.open(path, os.O_RDONLY)
pool = Pool(8)
asks = [(o, n) for o in range(0, len(content) + 8192, 4093) for n in (1, 4096, 70000)]
for i, (o, n) in enumerate(asks):
    pool.submit(fd, o, n, i)
pool.submit(12345, 0, 10, -1)
got = {}
while len(got) < len(asks) + 1:
    select.select([pool.fileno()], [], [], 5)
    for tag, value in pool.completed():
        got[tag] = value
for i, (o, n) in enumerate(asks):
    assert got[i] == content[o:o + n], i
assert isinstance(got[-1], OSError)
for o in range(0, len(content), 4096):
    pool.submit(fd, o, 4096, o)
pool.close()
dropped = Pool(3)
for o in range(0, len(content), 4096):
    dropped.submit(fd, o, 4096, None)
del dropped
print("ok")
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path,
                                                          data: tuple[Path, bytes]) -> None:
    sanitizers.build(SOURCE, tmp_path, "-lpthread")
    done = subprocess.run([sys.executable, "-c", EXERCISE, str(tmp_path), str(data[0])],
                          capture_output=True, text=True, timeout=300,
                          env=sanitizers.environment())
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    assert "runtime error" not in done.stderr and "AddressSanitizer" not in done.stderr


@pytest.mark.parametrize("compiled", WAYS)
def test_a_callback_that_fails_loses_no_other_answer(compiled: bool,
                                                     data: tuple[Path, bytes]) -> None:
    path, content = data

    async def body() -> None:
        reads = DiskReads(asyncio.get_running_loop(), 2, compiled=compiled)
        fd = os.open(path, os.O_RDONLY)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(20)]

        def fails(result: bytes | OSError) -> None:
            raise RuntimeError("a callback's bug")

        try:
            for i, future in enumerate(futures):
                reads.read(fd, i * 4096, 10, fails if i % 3 == 0 else future.set_result)
            answered = await asyncio.wait_for(
                asyncio.gather(*(f for i, f in enumerate(futures) if i % 3)), 10)
            assert answered == [content[i * 4096:i * 4096 + 10] for i in range(20) if i % 3]
        finally:
            reads.close()
            os.close(fd)

    asyncio.run(body())
