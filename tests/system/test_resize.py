"""Growing attached volumes online: engine, FUSE file, loop device and file system (root)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from cargohold.clients import kernel
from tests.conftest import Node, leftovers, needs_root
from tests.conftest import sha256_of as _sha256
from tests.conftest import write_random as _write_random

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20
#: ext4 grows online only with CAP_SYS_RESOURCE (kernel: ext4_resize_begin); some sandboxes
#: run root without it. There the lower layers must still grow and the error must say why.
ONLINE_EXT4 = kernel.has_capability(kernel.CAP_SYS_RESOURCE)
NO_ONLINE_EXT4 = "this host runs without CAP_SYS_RESOURCE: ext4 cannot grow online here"


def _fs_grows(fs: str) -> bool:
    return fs == "xfs" or ONLINE_EXT4


def _df_total(mountpoint: str) -> int:
    """The size ``df`` reports for the file system at ``mountpoint``, in bytes."""
    out = subprocess.run(["df", "-B1", "--output=size", mountpoint], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[-1])


def _device_size(device: str) -> int:
    out = subprocess.run(["blockdev", "--getsize64", device], capture_output=True, text=True,
                         check=True).stdout
    return int(out)


@pytest.mark.parametrize("fs,before,after", [("ext4", 256, 1024), ("xfs", 512, 1536)])
def test_grow_while_mounted_and_in_use(node: Node, fs: str, before: int, after: int) -> None:
    node.cli("volume", "create", "data", "--size", f"{before}M", "--fs", fs, "--replicas", "2")
    mountpoint = node.cli("volume", "attach", "data").stdout.strip()
    attached = node.json("volume", "inspect", "data")
    assert isinstance(attached, dict)
    device, fuse_file = attached["attachment"]["device"], \
        node.state / "engines" / "data" / "fuse" / "volume"
    old_total = _df_total(mountpoint)
    assert old_total <= before * MIB
    digest = _write_random(Path(mountpoint) / "before.bin", 64 * MIB)

    # a writer keeps going (write + fsync) while the volume grows under it
    errors: list[BaseException] = []
    written = [0]
    stop = threading.Event()

    def writer() -> None:
        try:
            with open(Path(mountpoint) / "during.bin", "wb") as f:
                while not stop.is_set() and written[0] < 32:
                    f.write(b"%08d" % written[0] * (MIB // 8))
                    f.flush()
                    os.fsync(f.fileno())
                    written[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        done = node.cli("volume", "resize", "data", "--size", f"{after}M", "-o", "json",
                        check=_fs_grows(fs))
    finally:
        stop.set()
        thread.join(60)
    assert not errors, f"writes failed during the resize: {errors}\n{node.logs()}"
    inspected = node.json("volume", "inspect", "data")
    assert isinstance(inspected, dict) and inspected["size"] == after * MIB
    assert inspected["state"] == "attached"

    # every layer sees the new size: FUSE file (kernel attributes), loop device, df
    assert fuse_file.stat().st_size == after * MIB
    assert _device_size(device) == after * MIB
    assert "grew from" in node.logs()
    if not _fs_grows(fs):
        assert done.returncode == 2 and "[expand_failed]" in done.stderr, done.stderr
        assert "CAP_SYS_RESOURCE" in done.stderr and "'grow file system'" in done.stderr
        assert _df_total(mountpoint) == old_total
        assert _sha256(Path(mountpoint) / "before.bin") == digest
        node.cli("volume", "detach", "data")
        mountpoint = node.cli("volume", "attach", "data").stdout.strip()
        assert _sha256(Path(mountpoint) / "before.bin") == digest
        node.cli("volume", "detach", "data")
        node.stop()
        assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}
        pytest.skip(NO_ONLINE_EXT4 + " (engine, FUSE file and loop device did grow)")
    new_total = _df_total(mountpoint)
    assert new_total > old_total and new_total > (after - before // 2) * MIB, (old_total,
                                                                              new_total)

    # the data is intact, and a file bigger than the old volume fits now
    assert _sha256(Path(mountpoint) / "before.bin") == digest
    count = written[0]
    with open(Path(mountpoint) / "during.bin", "rb") as f:
        for i in range(count):
            assert f.read(MIB) == b"%08d" % i * (MIB // 8)
    big = _write_random(Path(mountpoint) / "big.bin", (before + 64) * MIB)

    # resizing to the same size again is a no-op that succeeds
    same = node.json("volume", "resize", "data", "--size", f"{after}M")
    assert isinstance(same, dict) and same["size"] == after * MIB
    shrink = node.cli("volume", "resize", "data", "--size", f"{before}M", check=False)
    assert shrink.returncode == 2 and "cannot shrink" in shrink.stderr
    assert _df_total(mountpoint) == new_total

    # detach and attach again: the size and every byte stay
    node.cli("volume", "detach", "data")
    assert leftovers(node.base)["loops"] == [] and node.engine_pids() == []
    mountpoint = node.cli("volume", "attach", "data").stdout.strip()
    assert _df_total(mountpoint) == new_total
    assert _device_size(node.json("volume", "inspect", "data")["attachment"]["device"]) \
        == after * MIB  # type: ignore[index]
    assert _sha256(Path(mountpoint) / "before.bin") == digest
    assert _sha256(Path(mountpoint) / "big.bin") == big
    node.cli("volume", "detach", "data")
    node.cli("volume", "rm", "data")
    node.stop()
    assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}


@pytest.mark.parametrize("fs,before,after", [("ext4", 128, 512), ("xfs", 320, 1280)])
def test_grown_while_detached_the_file_system_follows_at_attach(node: Node, fs: str,
                                                                 before: int, after: int) -> None:
    node.cli("volume", "create", "later", "--size", f"{before}M", "--fs", fs)
    mountpoint = node.cli("volume", "attach", "later").stdout.strip()
    (Path(mountpoint) / "f").write_text("kept")
    old_total = _df_total(mountpoint)
    node.cli("volume", "detach", "later")
    node.cli("volume", "resize", "later", "--size", f"{after}M")
    mountpoint = node.cli("volume", "attach", "later").stdout.strip()  # the new size at once
    device = node.json("volume", "inspect", "later")["attachment"]["device"]  # type: ignore
    assert _device_size(device) == after * MIB
    assert (Path(mountpoint) / "f").read_text() == "kept"
    total = _df_total(mountpoint)
    node.cli("volume", "detach", "later")
    node.stop()
    assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}
    if not _fs_grows(fs):
        assert total == old_total and "CAP_SYS_RESOURCE" in node.logs()
        pytest.skip(NO_ONLINE_EXT4 + " (the loop device did grow)")
    assert total > 3 * old_total and total <= after * MIB


def test_engine_gone_gives_a_clear_error_and_the_retry_finishes(node: Node) -> None:
    node.cli("volume", "create", "retry", "--size", "320M", "--fs", "xfs")
    mountpoint = node.cli("volume", "attach", "retry").stdout.strip()
    engine = node.engine_pids()[0]
    os.kill(engine, 19)  # SIGSTOP: the engine cannot answer the resize signal in time
    try:
        done = node.cli("volume", "resize", "retry", "--size", "640M", check=False)
    finally:
        os.kill(engine, 18)  # SIGCONT
    if done.returncode == 0:  # the engine caught up within the agent's wait: also fine
        assert _df_total(mountpoint) > 400 * MIB
    else:
        assert done.returncode == 2 and "[expand_failed]" in done.stderr, done.stderr
        assert "run 'cargohold volume resize retry" in done.stderr
        assert node.json("volume", "inspect", "retry")["size"] == 640 * MIB  # type: ignore
        node.cli("volume", "resize", "retry", "--size", "640M")  # finishes the expansion
        assert _df_total(mountpoint) > 400 * MIB
    node.cli("volume", "detach", "retry")
    node.stop()
    assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}
