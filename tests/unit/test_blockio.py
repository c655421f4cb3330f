"""A replica's plain writes and cached reads (stores/blockio.py): the compiled writer
and the Python one do the same to the files, maps and counters for the same calls, read the
same, refuse the same calls, and fail the same way; the C is run once more built with
AddressSanitizer and UndefinedBehaviorSanitizer, together with the data server's compiled
request path that serves through it (adapters/dataserver/_fastio.c)."""

from __future__ import annotations

import mmap
import os
import random
import shutil
import subprocess
import sys
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from cargohold.adapters.dataserver import fastio
from cargohold.core.layout import BLOCK_SIZE
from cargohold.stores import blockio
from tests import sanitizers

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover
    from zlib import crc32

pytestmark = pytest.mark.skipif(not blockio.compiled_built(),
                                reason="stores/_blockio.c was not built")

CHUNK = 64 << 10  # small chunks: many of them in a small file
SIZE = 4 << 20
PAGES = SIZE // BLOCK_SIZE * 4 // mmap.PAGESIZE  # pages of sums


class Replica:
    """The files and maps a writer works on, in a directory of their own."""

    def __init__(self, root: Path, compiled: bool, readonly: bool = False,
                 reserve: bool = False) -> None:
        root.mkdir()
        for name, size in (("data", SIZE), ("sums", SIZE // BLOCK_SIZE * 4),
                           ("gens", SIZE // CHUNK * 8)):
            with open(root / name, "wb") as f:
                f.truncate(size)
        self.root = root
        self.fd = os.open(root / "data", os.O_RDONLY if readonly else os.O_RDWR)
        self.maps = [mmap.mmap(os.open(root / name, os.O_RDWR), 0) for name in ("sums", "gens")]
        self.sums_backed = bytearray(PAGES)
        self.gens_backed = bytearray(max(1, SIZE // CHUNK * 8 // mmap.PAGESIZE))
        kind = blockio._blockio.BlockIO if compiled else blockio.BlockIO
        self.w = kind(self.fd, self.maps[0], self.maps[1], self.sums_backed, self.gens_backed,
                      size=SIZE, epoch=3, chunk=CHUNK, piece=16 << 10, small=32 << 10,
                      reserve=reserve, crc32=crc32)

    def state(self) -> tuple[Any, ...]:
        w = self.w
        return (os.pread(self.fd, SIZE, 0), bytes(self.maps[0]), bytes(self.maps[1]),
                w.begun, w.ended, w.small_writes, w.chunks_written, sorted(w.small_chunks))

    def close(self) -> None:
        self.w.close()
        for m in self.maps:
            m.close()
        os.close(self.fd)


def outcome(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:  # compared by type and errno
        return type(exc), getattr(exc, "errno", None)


@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_writer_does_what_the_python_one_does(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    reserve = seed % 2 == 1  # under a space reserve, a never-written chunk is refused
    pair = [Replica(tmp_path / "c", True, reserve=reserve),
            Replica(tmp_path / "py", False, reserve=reserve)]
    reads = {True: 0, False: 0}
    try:
        for step in range(400):
            kind = rng.random()
            if kind < 0.1:  # a page of sums or gens gets space
                which, page = rng.choice(["sums", "gens"]), rng.randrange(PAGES)
                for r in pair:
                    flags = r.sums_backed if which == "sums" else r.gens_backed
                    flags[page % len(flags)] = 1
                continue
            blocks = rng.choice([1, 1, 1, 2, 5, 16, 33, 70])
            offset = rng.randrange(SIZE // BLOCK_SIZE + 2) * BLOCK_SIZE
            if rng.random() < 0.05:
                offset += rng.randrange(1, BLOCK_SIZE)  # not a block's start: refused
            length = blocks * BLOCK_SIZE - (rng.random() < 0.05)
            data = rng.randbytes(length) if rng.random() < 0.9 else bytes(length)
            generation = rng.choice([0, step, step + 1, 2**64 - 1])
            prepared = rng.random() < 0.3
            if rng.random() < 0.3:  # a read back, of what is there or of nothing
                if rng.random() < 0.1:  # a block whose checksum does not match: refused
                    bad = rng.randrange(SIZE // BLOCK_SIZE) * BLOCK_SIZE
                    for r in pair:
                        os.pwrite(r.fd, b"?", bad)
                answers = [r.w.read_cached(offset, length) for r in pair]
                assert answers[0] == answers[1], (step, offset, length)
                reads[answers[0] is not None] += 1
                if answers[0] is not None:  # the file's blocks, zeros where never written
                    stored = memoryview(pair[1].maps[0]).cast("I")
                    for k in range(0, length, BLOCK_SIZE):
                        want = bytes(BLOCK_SIZE) if not stored[(offset + k) // BLOCK_SIZE] \
                            else os.pread(pair[1].fd, BLOCK_SIZE, offset + k)
                        assert answers[0][k:k + BLOCK_SIZE] == want
                    stored.release()
                continue
            results = [outcome(partial(r.w.write, offset, data, generation, prepared))
                       for r in pair]
            assert results[0] == results[1], (step, offset, length, generation, prepared)
            assert pair[0].state() == pair[1].state(), step
        assert pair[0].w.ended > 50  # most of the writes were taken, not refused
        assert reads[True] > 10 and reads[False] > 2  # reads answered, and refused
        for r in pair:
            r.w.close()
            assert not r.w.open
            assert r.w.write(0, bytes(BLOCK_SIZE), 1, True) is False
        assert pair[0].state() == pair[1].state()
    finally:
        for r in pair:
            r.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_a_failed_pwrite_raises_and_leaves_the_checksums(tmp_path: Path, compiled: bool) -> None:
    r = Replica(tmp_path / "r", compiled, readonly=True)
    try:
        with pytest.raises(OSError) as failed:
            r.w.write(0, b"x" * BLOCK_SIZE, 5, True)
        assert failed.value.errno == 9  # EBADF: the data file is open read-only
        assert (r.w.begun, r.w.ended, r.w.chunks_written) == (1, 0, 0)
        assert bytes(r.maps[0]) == bytes(len(r.maps[0]))
        assert bytes(r.maps[1]) == bytes(len(r.maps[1]))
    finally:
        r.close()


def test_the_counters_and_the_small_chunks_are_the_replicas_to_set(tmp_path: Path) -> None:
    r = Replica(tmp_path / "r", True)
    try:
        r.sums_backed[:] = b"\1" * len(r.sums_backed)
        r.gens_backed[:] = b"\1" * len(r.gens_backed)
        assert r.w.write(CHUNK * 3, b"a" * BLOCK_SIZE, 9)
        assert r.w.small_chunks == {3} and r.w.small_writes == 1
        taken, r.w.small_chunks = r.w.small_chunks, set()
        r.w.small_writes = 0
        assert taken == {3} and r.w.small_chunks == set()
        with pytest.raises(TypeError):
            r.w.small_chunks = [1]
        assert r.maps[0][CHUNK * 3 // BLOCK_SIZE * 4:][:4] == \
            (zlib.crc32(b"a" * BLOCK_SIZE) or 1).to_bytes(4, sys.byteorder)
        r.w.epoch = 12
        assert r.w.epoch == 12
    finally:
        r.close()


EXERCISE = r"""
import glob, importlib.util, mmap, os, struct, sys
here = sys.argv[1]
def load(name, place):
    [path] = glob.glob(f"{here}/{place}/_*.so")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
import cargohold.stores
_blockio = load("cargohold.stores._blockio", "stores")
cargohold.stores._blockio = _blockio  # where the capsule is looked up
_fastio = load("cargohold.adapters.dataserver._fastio", "dataserver")
from cargohold.core.wire import MAGIC, VERSION, MAX_PAYLOAD, Op, Status, REQUEST_HEADER
from zlib import crc32
SIZE = 1 << 20
files = {}
for name, size in (("data", SIZE), ("sums", SIZE // 1024), ("gens", 16 * 8)):
    with open(f"{here}/{name}", "wb") as f:
        f.truncate(size)
    files[name] = os.open(f"{here}/{name}", os.O_RDWR)
sums, gens = mmap.mmap(files["sums"], 0), mmap.mmap(files["gens"], 0)
w = _blockio.BlockIO(files["data"], sums, gens, bytearray(b"\1"), bytearray(b"\1"),
                     size=SIZE, epoch=4, chunk=65536, piece=16384, small=65536,
                     reserve=False, crc32=crc32)
for offset, n in ((0, 4096), (4096 * 3, 4096 * 70), (SIZE - 4096, 4096), (SIZE, 4096),
                  (1, 4096), (0, 5)):
    w.write(offset, os.urandom(n), 7)
for offset, n in ((0, 4096), (4096 * 3, 4096 * 70), (SIZE - 4096, 4096), (SIZE, 4096),
                  (1, 4096), (0, 5), (0, 0), (8192, 1 << 16), (SIZE - 4096, 8192)):
    got = w.read_cached(offset, n)
    assert got is None or len(got) == n
assert w.read_cached(SIZE - 8192, 4096) == bytes(4096)  # never written: zeros
fast = _fastio.FastIO(magic=MAGIC, version=VERSION, write_op=Op.WRITE,
                      shared_op=Op.WRITE_SHARED, read_op=Op.READ, ok=Status.OK,
                      max_payload=MAX_PAYLOAD, read_max=1 << 16)
volume = bytes(range(16))
fast.allow(volume, w, 0)
shared = bytearray(1 << 18)
shared[4096:4096 + 65536] = os.urandom(65536)
fast.share(memoryview(shared))
def frame(op, rid, epoch, offset, length, payload, vol=volume):
    return REQUEST_HEADER.pack(MAGIC, VERSION, op, rid, vol, epoch, offset, length, 9,
                               len(payload)) + payload
first = os.urandom(4096)
stream = b"".join([frame(Op.WRITE, 1, 4, 0, 4096, first),
                   frame(Op.WRITE_SHARED, 2, 4, 8192, 65536, struct.pack("!Q", 4096)),
                   frame(Op.READ, 5, 4, 0, 4096, b""),
                   frame(Op.READ, 6, 4, 8192, 8192, b""),
                   frame(Op.WRITE_SHARED, 3, 4, 0, 4096, struct.pack("!Q", (1 << 18) - 10)),
                   frame(Op.WRITE, 4, 4, 0, 4096, os.urandom(4096)),
                   frame(Op.READ, 7, 4, 0, 1 << 17, b"")])
buf = bytearray(stream) + bytearray(100)
out = []
pos = fast.serve(memoryview(buf), 0, len(stream), out, 1 << 20)
answers = 12 + 12 + 12 + 4096 + 12 + 8192
assert out and len(out[0]) == answers and pos == 4 * 56 + 4096 + 8, (pos, out)
assert out[0][24 + 12:24 + 12 + 4096] == first
assert out[0][-8192:] == bytes(shared[4096:4096 + 8192])
assert fast.served == 2 and fast.reads_served == 2 and fast.queued == 4096 + 8192
three = 3 * 56 + 4096 + 8  # the second read alone does not fit in this budget
assert fast.serve(memoryview(buf), 0, len(stream), [], 4096 + 4096) == three
for cut in range(0, len(stream), 97):  # every truncation: no read past the end
    assert fast.serve(memoryview(buf), 0, cut, [], 1 << 20) <= cut
out = []
assert fast.serve(memoryview(buf), 0, len(stream), out) >= 0
import random
rng = random.Random(7)
for _ in range(3000):  # mangled streams: a byte, a length, an offset or an op changed
    mangled = bytearray(stream)
    for _ in range(rng.randrange(1, 4)):
        mangled[rng.randrange(len(mangled))] = rng.randrange(256)
    if rng.random() < 0.3:
        at = rng.choice([40, 52, 56 + 4096 + 40, 56 + 4096 + 52, 2 * 56 + 4096 + 8 + 40,
                         3 * 56 + 4096 + 8 + 32])
        mangled[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x10\x00",
                                         b"\x00\x01\x00\x00"])
    end = rng.randrange(len(mangled) + 1)
    exact = bytearray(mangled[:end])  # a read past the end is a heap overflow ASan reports
    pos = fast.serve(memoryview(exact), 0, end, [], rng.choice([0, 4096, 1 << 20]))
    assert 0 <= pos <= end
fast.forget(volume)
assert fast.serve(memoryview(buf), 0, len(stream), []) == 0
for i in range(40):  # more volumes than entries
    fast.allow(bytes([i]) * 16, w, 0)
fast.unshare()
fast.clear()
w.close()
assert fast.served > 2
print("ok")
"""


@pytest.mark.skipif(shutil.which("gcc") is None or not fastio.built(),
                    reason="needs gcc and the compiled request path")
def test_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path) -> None:
    sources = {"stores": Path(blockio.__file__).with_name("_blockio.c"),
               "dataserver": Path(fastio.__file__).with_name("_fastio.c")}
    for place, source in sources.items():
        (tmp_path / place).mkdir()
        sanitizers.build(source, tmp_path / place, f"-I{sources['stores'].parent}")
    done = subprocess.run([sys.executable, "-c", EXERCISE, str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env=sanitizers.environment())
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    assert "runtime error" not in done.stderr and "AddressSanitizer" not in done.stderr
