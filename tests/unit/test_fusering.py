"""services/engine/_fusering.c on its own: bad arguments are refused with clear errors and
nothing is left open; a file that is no FUSE device is refused at registration.
The ring serving a real mount is tests/integration/test_fuse_transport.py."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from cargohold.services.engine import fuse

pytestmark = pytest.mark.skipif(fuse._fusering is None, reason="_fusering.c was not built")
Ring = fuse._fusering.Ring if fuse._fusering is not None else None
MIB = 1 << 20


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_extension_is_built_here() -> None:
    assert fuse._fusering is not None  # setup.py builds it (optional: silent if it fails)


@pytest.mark.parametrize(("queues", "per_queue", "payload_size", "buffer"), [
    (0, 4, MIB, 4 * MIB),        # no queue
    (1, 0, MIB, MIB),            # no entry
    (1, 4, 1000, 4 * MIB),       # not whole pages
    (1, 4, MIB, 4 * MIB - 1),    # payloads too small for the entries
    (2048, 4, 4096, 64 * MIB),   # more entries than a ring takes
])
def test_bad_sizes_are_refused_and_leave_nothing_open(
        queues: int, per_queue: int, payload_size: int, buffer: int) -> None:
    before = open_fds()
    payloads = mmap.mmap(-1, buffer)
    with pytest.raises(ValueError):
        Ring(0, queues, per_queue, payload_size, payloads)
    assert open_fds() == before
    payloads.close()  # not held by a ring that was refused


def test_read_only_payloads_are_refused() -> None:
    with pytest.raises(BufferError):
        Ring(0, 1, 1, 4096, bytes(4096))


def test_a_file_that_is_no_fuse_device_is_refused_at_registration(tmp_path: Path) -> None:
    payloads = mmap.mmap(-1, 2 * MIB)
    (tmp_path / "plain").write_bytes(b"")
    with open(tmp_path / "plain", "rb") as plain:  # (/dev/null takes any ring command)
        ring = Ring(plain.fileno(), 1, 2, MIB, payloads)
        assert ring.count == 2 and ring.fd >= 0 and not ring.ended
        with pytest.raises(OSError):
            ring.register()
        ring.close()
    assert ring.fd == -1
    for call in (ring.take, ring.submit, ring.register):
        with pytest.raises(ValueError, match="closed"):
            call()
    payloads.close()  # released by close(): unmapping it does not fail


def test_replies_name_an_entry_that_holds_a_request() -> None:
    payloads = mmap.mmap(-1, 2 * MIB)
    ring = Ring(-1, 1, 2, MIB, payloads)
    try:
        with pytest.raises(IndexError):
            ring.reply(2, 0, 0)
        with pytest.raises(IndexError):
            ring.reply_data(-1, b"")
        with pytest.raises(ValueError):
            ring.reply(0, 5, 0)  # errors are 0 or -errno
        with pytest.raises(ValueError, match="does not fit"):
            ring.reply_data(0, bytes(MIB + 1))
        with pytest.raises(TypeError):
            ring.reply(0, 0)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="holds no request"):
            ring.reply(1, 0, 0)  # not taken: the kernel never gave it a request
        assert ring.take() == []  # nothing arrived
    finally:
        ring.close()
        payloads.close()


def test_possible_cpus_reads_the_kernels_list() -> None:
    assert fuse.possible_cpus() >= 1
    assert fuse.possible_cpus() >= (os.cpu_count() or 1)
