"""The engine's FUSE session on both of the kernel's transports: /dev/fuse, and FUSE over
io_uring (services/engine/_fusering.c), with a real mount, loop device and ext4.

The session serves a volume held in memory from an event loop in a thread of this process;
the test is the kernel's other side: a loop device with direct I/O on the session's file, as
the agent sets it up. What is written through it must be what the target holds, and what the
target holds must be what is read; failures must reach the writer as errnos.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from cargohold.clients.sharedmemory import SLOTS, SharedMemory
from cargohold.errors import CargoholdError, NoSpace
from cargohold.services.engine import fuse
from tests import sanitizers

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")

SIZE = 64 << 20
URING = Path(fuse.URING_PARAMETER)


class MemoryVolume:
    """A BlockTarget in memory; writes at ``failing`` offsets fail."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.failing: dict[int, Exception] = {}
        self.flushes = 0
        self.trims: list[tuple[int, int]] = []
        self.shared_writes = 0
        self.in_place = 0  # reads answered in the buffer of the reply
        self.retire: SharedMemory | None = None  # hold the first shared write's slot for good
        self.retired: tuple[int, bytes] | None = None  # (slot, its bytes then)

    def read_at_once(self, offset: int, length: int, into: memoryview | None = None
                     ) -> bytes | None:
        if offset % 8192 == 4096:  # every other block the slow way: a future, later
            return None
        if into is not None and offset % 16384 == 0:  # some where the reply goes (the ring)
            into[:length] = self.data[offset:offset + length]
            self.in_place += 1
            return into
        return bytes(self.data[offset:offset + length])

    def start_read(self, offset: int, length: int) -> asyncio.Future[bytes]:
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(
            done.set_result, bytes(self.data[offset:offset + length]))
        return done

    def start_write(self, offset: int, data: object, shared_at: int = -1
                    ) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        if offset in self.failing:
            done.set_exception(self.failing[offset])
            return done
        view = memoryview(data)  # type: ignore[arg-type]
        self.data[offset:offset + len(view)] = view
        self.shared_writes += shared_at >= 0
        if shared_at >= 0 and self.retire is not None and self.retired is None:
            # as a data client whose connection failed with this write unanswered: it keeps
            # holding the slot (its server may still read it)
            slot = self.retire.hold(shared_at)
            self.retired = (slot, bytes(self.retire.slot(slot)))
        asyncio.get_running_loop().call_soon(done.set_result, None)
        return done

    async def flush(self) -> None:
        self.flushes += 1

    async def trim(self, offset: int, length: int) -> None:
        self.trims.append((offset, length))
        self.data[offset:offset + length] = bytes(length)


class Served:
    """A FuseSession on ``mountpoint`` in a thread of its own, until ``stop``."""

    def __init__(self, target: MemoryVolume, mountpoint: Path, shared: SharedMemory) -> None:
        self.loop = uvloop.new_event_loop()  # as the engine runs it
        self.session = fuse.FuseSession(target, str(mountpoint), shared)  # type: ignore[arg-type]
        self.mountpoint = mountpoint
        started = threading.Event()
        self.error: BaseException | None = None

        async def serve() -> None:
            self.session.start()
            started.set()
            await self.session.wait_closed()
            await self.session.drain()

        def run() -> None:
            try:
                self.loop.run_until_complete(serve())
            except BaseException as e:  # noqa: BLE001 - reported by the test
                self.error = e
                started.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(10)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", str(self.mountpoint)], check=True)
        self.thread.join(10)
        assert not self.thread.is_alive(), "the FUSE session did not end at unmount"
        self.loop.close()


@contextlib.contextmanager
def kernel_transport(name: str) -> Iterator[str]:
    """The kernel's FUSE over io_uring switched on for "io_uring", off for "/dev/fuse", and
    back as it was after."""
    os.close(os.open("/dev/fuse", os.O_RDWR))  # loads the fuse module, if it is one
    before = URING.read_text().strip() if URING.exists() else None
    if name == "io_uring":
        if before is None:
            pytest.skip("this kernel has no FUSE over io_uring")
        assert fuse._fusering is not None, "services/engine/_fusering.c was not built"
        if os.environ.get("CARGOHOLD_COMPILED") == "0":
            pytest.skip("CARGOHOLD_COMPILED=0: the session reads /dev/fuse")
    if before is not None:
        URING.write_text("1" if name == "io_uring" else "0")
    try:
        yield name
    finally:
        if before is not None:
            URING.write_text("1" if before == "Y" else "0")


@pytest.fixture(params=["/dev/fuse", "io_uring"])
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    with kernel_transport(request.param) as name:
        yield name


@pytest.fixture
def ring() -> Iterator[str]:
    """For what only the ring has."""
    with kernel_transport("io_uring") as name:
        yield name


@contextlib.contextmanager
def volume(tmp_path: Path, target: MemoryVolume, retire: bool = False
           ) -> Iterator[tuple[Served, str]]:
    """The target served, with a loop device on its file as the agent makes one."""
    mountpoint = tmp_path / "fuse"
    mountpoint.mkdir()
    shared = SharedMemory(fuse.READ_BUFFER, SLOTS + fuse.ring_slots())  # as the engine
    if retire:
        target.retire = shared
    served = Served(target, mountpoint, shared)
    device = ""
    try:
        device = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096",
             str(mountpoint / fuse.FILE_NAME.decode())],
            capture_output=True, text=True, check=True).stdout.strip()
        yield served, device
    finally:
        if device:
            subprocess.run(["losetup", "-d", device], check=False)
        served.stop()
        shared.close()


def direct(device: str, offset: int, data: bytes | None = None, length: int = 0) -> bytes:
    """Write ``data`` at ``offset`` (or read ``length`` bytes) with O_DIRECT."""
    fd = os.open(device, (os.O_RDWR if data is not None else os.O_RDONLY) | os.O_DIRECT)
    try:
        size = len(data) if data is not None else length
        buffer = mmap.mmap(-1, size)  # page aligned, as O_DIRECT needs
        if data is not None:
            buffer[:] = data
            assert os.pwritev(fd, [buffer], offset) == size
            return b""
        assert os.preadv(fd, [buffer], offset) == size
        return bytes(buffer)
    finally:
        os.close(fd)


def test_blocks_written_through_the_loop_device_are_what_the_target_holds(
        tmp_path: Path, transport: str) -> None:
    target = MemoryVolume(SIZE)
    pieces = [(0, os.urandom(4096)), (12288, os.urandom(8192)), (1 << 20, os.urandom(1 << 20)),
              (5 << 20, os.urandom(256 << 10)), (SIZE - 4096, os.urandom(4096))]
    with volume(tmp_path, target) as (served, device):
        assert served.session.transport == transport
        for offset, data in pieces:
            direct(device, offset, data)
        for offset, data in pieces:
            assert target.data[offset:offset + len(data)] == data
            assert direct(device, offset, length=len(data)) == data
        target.data[8 << 20:(8 << 20) + 65536] = pattern = os.urandom(65536)
        assert direct(device, 8 << 20, length=65536) == pattern  # read what the target holds
        # writes of 64 KiB and more reach the target from a shared slot (the data servers
        # on this host read them there), smaller ones as bytes of their own
        assert target.shared_writes >= 2
        assert (target.in_place > 0) == (transport == "io_uring")


def test_a_file_system_on_it_keeps_its_files_and_flushes_reach_the_target(
        tmp_path: Path, transport: str) -> None:
    target = MemoryVolume(SIZE)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with volume(tmp_path, target) as (served, device):
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
        subprocess.run(["mount", device, str(mnt)], check=True)
        try:
            files = {f"f{k}": os.urandom(k * 37_000 + 1) for k in range(12)}
            for name, data in files.items():
                (mnt / name).write_bytes(data)
            flushes = target.flushes
            subprocess.run(["sync", "-f", str(mnt)], check=True)
            assert target.flushes > flushes  # fsync reached the target: FSYNC answered
            subprocess.run(["fstrim", str(mnt)], check=False)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        subprocess.run(["mount", device, str(mnt)], check=True)
        try:
            for name, data in files.items():
                got = (mnt / name).read_bytes()
                assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        assert served.session.transport == transport


def test_a_slot_a_data_client_still_holds_is_never_filled_again(
        tmp_path: Path, ring: str) -> None:
    """Through the ring, a large write's data servers read it from the entry's own payload
    buffer, a shared slot. One whose data client kept holding it (retired with its failed
    connection) leaves the ring before the entry is answered: later requests never land
    there, and it is free again once let go."""
    target = MemoryVolume(SIZE)
    with volume(tmp_path, target, retire=True) as (served, device):
        pieces = [(k * (256 << 10), os.urandom(256 << 10)) for k in range(160)]
        for offset, data in pieces:  # every entry of the ring several times over
            direct(device, offset, data)
        assert target.retired is not None
        slot, then = target.retired
        shared = target.retire
        assert shared is not None
        window = served.session._window
        assert window is not None and slot not in window.slots
        assert bytes(shared.slot(slot)) == then  # nothing wrote there since
        assert target.data[:len(pieces) * (256 << 10)] == b"".join(d for _, d in pieces)
        free = shared.free
        shared.release(slot)  # the data client lets go
        assert shared.free == free + 1
        offset, data = 40 << 20, os.urandom(1 << 20)
        direct(device, offset, data)
        assert direct(device, offset, length=len(data)) == data


def test_failed_writes_reach_the_writer_as_errnos(tmp_path: Path, transport: str) -> None:
    target = MemoryVolume(SIZE)
    target.failing[4096] = CargoholdError(detail="replicas gone")
    target.failing[1 << 20] = NoSpace(server="s", detail="full")
    with volume(tmp_path, target) as (_served, device):
        with pytest.raises(OSError) as failed:
            direct(device, 4096, os.urandom(4096))
        assert failed.value.errno == 5  # EIO
        with pytest.raises(OSError) as full:
            direct(device, 1 << 20, os.urandom(1 << 20))
        assert full.value.errno == 28  # ENOSPC
        direct(device, 8192, b"x" * 4096)  # the volume goes on
        assert target.data[8192:12288] == b"x" * 4096
        assert target.data[4096:8192] == bytes(4096)


def open_files() -> set[str]:
    """What this process holds open (fd and what it is: numbers alone are reused)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found.add(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
    return found


def test_nothing_is_left_after_the_session_ends(tmp_path: Path, transport: str) -> None:
    target = MemoryVolume(SIZE)
    rings_before = sum("io_uring" in f for f in open_files())  # (libuv keeps rings too)
    with volume(tmp_path, target) as (served, device):
        direct(device, 0, os.urandom(4096))
        during = open_files()
        session = served.session
        ring_fd = session._ring.fd if session._ring is not None else -1
    assert any("/dev/fuse" in f for f in during)
    assert (f"{ring_fd} anon_inode:[io_uring]" in during) == (transport == "io_uring")
    # the session object lives on (the test holds it), its FUSE connection and ring do not
    assert session.fd < 0 and session.transport == "/dev/fuse"
    after = open_files()
    assert not any("/dev/fuse" in f for f in after)
    assert sum("io_uring" in f for f in after) <= rings_before
    assert not os.path.ismount(tmp_path / "fuse")
    loops = subprocess.run(["losetup", "-j", str(tmp_path / "fuse" / "volume")],
                           capture_output=True, text=True, check=True).stdout
    assert loops == ""


#: Run under the sanitizers, with the ring module built with them: a FUSE session on a ring
#: served in a thread, writes and reads of several sizes through a loop device, failures,
#: then an unmount with the ring's entries still registered.
EXERCISE = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("cargohold.services.engine._fusering", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["cargohold.services.engine._fusering"] = module
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import test_fuse_transport as t
assert t.fuse._fusering is module
tmp = Path(sys.argv[3])
target = t.MemoryVolume(t.SIZE)
target.failing[4096] = t.CargoholdError(detail="gone")
with t.volume(tmp, target) as (served, device):
    assert served.session.transport == "io_uring"
    for size in (4096, 8192, 65536, 1 << 20):
        data = os.urandom(size)
        t.direct(device, 1 << 20, data)
        assert t.direct(device, 1 << 20, length=size) == data
    try:
        t.direct(device, 4096, os.urandom(4096))
        raise SystemExit("a failed write succeeded")
    except OSError:
        pass
print("ok")
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_the_ring_under_address_and_undefined_behaviour_sanitizers(
        tmp_path: Path, ring: str) -> None:
    source = Path(fuse.__file__).with_name("_fusering.c")
    built = sanitizers.build(source, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    try:
        done = subprocess.run([sys.executable, "-c", EXERCISE, str(built),
                               str(Path(__file__).parent), str(work)],
                              capture_output=True, text=True, timeout=300,
                              env=sanitizers.environment())
    finally:  # a process the sanitizers stopped leaves its mount and loop device behind
        fuse_file = work / "fuse" / fuse.FILE_NAME.decode()
        for device in subprocess.run(["losetup", "-j", str(fuse_file)], capture_output=True,
                                     text=True).stdout.splitlines():
            subprocess.run(["losetup", "-d", device.split(":")[0]], check=False)
        if str(work / "fuse") in Path("/proc/self/mounts").read_text():  # (a dead one too)
            subprocess.run(["umount", "-l", str(work / "fuse")], check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    assert "runtime error" not in done.stderr and "AddressSanitizer" not in done.stderr
