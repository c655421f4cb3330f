"""The host kernel facilities the agent drives: loop devices, file systems and mounts.

Thin wrappers over util-linux, e2fsprogs and xfsprogs (including the online growth of a
loop device and of the file system on it); each raises :class:`HostCommandFailed`
with the command's own message when it fails.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import subprocess
from pathlib import Path

from cargohold.errors import HostCommandFailed

FILESYSTEMS = ("ext4", "xfs")
MIN_XFS_SIZE = 300 << 20

MKFS = {
    # The volume reads zeros where nothing was written, so skipping discards and the
    # zeroing of inode tables is safe and keeps a fresh volume thin. The journal is zeroed
    # (FALLOC_FL_ZERO_RANGE, which the engine writes as zeros) so that its space is taken on
    # the data servers up front: on a full data server, journal commits then still succeed
    # (they overwrite), and deleting files + fstrim can free space. With a thin journal,
    # the first commit into an unwritten journal block fails with ENOSPC and ext4 aborts.
    "ext4": ["mkfs.ext4", "-q", "-F", "-m", "1", "-E",
             "nodiscard,lazy_itable_init=1,lazy_journal_init=0"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
}
#: Every volume is mounted nosuid,nodev: a file a container wrote there is never a set-uid
#: program or a device node for the host.
MOUNT_OPTIONS = {"ext4": "nosuid,nodev,noinit_itable", "xfs": "nosuid,nodev"}
CAP_SYS_RESOURCE = 24
GROW_SLACK = 4 << 20  # less room than this left on a device is not worth growing into


def run(argv: list[str], timeout: float = 120.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except FileNotFoundError as e:
        raise HostCommandFailed(argv, f"{argv[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise HostCommandFailed(argv, f"timed out after {timeout:.0f} s") from e
    if done.returncode != 0:
        raise HostCommandFailed(argv, (done.stderr or done.stdout).strip()
                                or f"exit status {done.returncode}")
    return done.stdout


def attach_loop(backing_file: str) -> str:
    """Put a loop device (4 KiB sectors, direct I/O) on ``backing_file``; return its path."""
    return run(["losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096",
                backing_file]).strip()


def detach_loop(device: str) -> None:
    run(["losetup", "--detach", device])


def refresh_loop(device: str) -> int:
    """Make ``device`` take the current size of its backing file; return its size in bytes.

    The loop driver reads the size the kernel holds for the backing file's inode; for a
    FUSE file, ``stat`` it first so that the kernel has asked the file system again.
    """
    run(["losetup", "--set-capacity", device])
    return device_size(device)


def device_size(device: str) -> int:
    """Bytes of the block device ``device``."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def loops_backed_by(backing_file: str) -> list[str]:
    """Loop devices whose backing file is ``backing_file`` (read from sysfs)."""
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing == backing_file:
            found.append(f"/dev/{entry.name}")
    return sorted(found)


def probe_filesystem(device: str) -> str:
    """The file system type found on ``device``, or "" if it holds none."""
    done = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                          capture_output=True, text=True, check=False)
    if done.returncode == 2:  # nothing found
        return ""
    if done.returncode != 0:
        raise HostCommandFailed(["blkid", "-p", device], done.stderr.strip())
    return done.stdout.strip()


def make_filesystem(device: str, fs: str, label: str) -> None:
    label_flag = ["-L", label[:12]] if fs == "xfs" else ["-L", label[:16]]
    run([*MKFS[fs], *label_flag, device], timeout=600)


def grow_filesystem(fs: str, device: str, mountpoint: str) -> None:
    """Grow the file system mounted at ``mountpoint`` (from ``device``) to fill the device.

    Online: ext4 with resize2fs on the device, xfs with xfs_growfs on the mount point. A
    file system that already fills its device is left as it is.
    """
    if fs == "ext4":
        if device_size(device) - ext4_size(device) < GROW_SLACK:
            return  # already fills the device (resize2fs leaves a too small last group off)
        if not has_capability(CAP_SYS_RESOURCE):  # ext4's online resize ioctls demand it
            raise HostCommandFailed(["resize2fs", device], "growing a mounted ext4 file system "
                                    "needs the CAP_SYS_RESOURCE capability, which this node "
                                    "runs without; the volume and its loop device did grow. "
                                    "Give the node CAP_SYS_RESOURCE")
        run(["resize2fs", device], timeout=600)
    elif fs == "xfs":
        run(["xfs_growfs", mountpoint], timeout=600)
    else:
        raise HostCommandFailed(["grow", fs], f"cannot grow a {fs} file system")


def ext4_size(device: str) -> int:
    """Bytes the ext4 file system on ``device`` spans (block count × block size)."""
    fields = {}
    for line in run(["dumpe2fs", "-h", device]).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        return int(fields["Block count"]) * int(fields["Block size"])
    except (KeyError, ValueError):
        raise HostCommandFailed(["dumpe2fs", "-h", device], "no block count in its output") \
            from None


def has_capability(bit: int) -> bool:
    """Whether this process holds the capability ``bit`` (linux/capability.h) effectively."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True  # cannot tell: let the command itself say


def mount(device: str, target: str, fs: str) -> None:
    os.makedirs(target, exist_ok=True)
    run(["mount", "-t", fs, "-o", MOUNT_OPTIONS[fs], device, target])


def unmount(target: str, lazy: bool = False) -> None:
    run(["umount", *(["--lazy"] if lazy else []), target])


def is_mounted(target: str) -> bool:
    target = os.path.realpath(target)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                return True
    return False


FIFREEZE = 0xC0045877  # linux/fs.h: _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)


def freeze(mountpoint: str) -> None:
    """Freeze the file system mounted at ``mountpoint`` (``fsfreeze -f``): its dirty data
    and journal are written, and writers wait until ``thaw``. Blocks while it writes: the
    caller must keep serving the device underneath (call it in a thread)."""
    _file_system_ioctl(mountpoint, FIFREEZE, "freeze")


def thaw(mountpoint: str) -> None:
    """Let the writers of a frozen file system go on (a file system not frozen: no-op)."""
    try:
        _file_system_ioctl(mountpoint, FITHAW, "thaw")
    except HostCommandFailed as e:
        if "Invalid argument" not in str(e):  # EINVAL: it was not frozen
            raise


def sync_file_system(mountpoint: str) -> None:
    """Write the dirty data and journal of the file system at ``mountpoint`` (syncfs(2)),
    writers going on meanwhile: before a freeze, so that the freeze, during which they
    wait, has only what they wrote since to write. Blocks like ``freeze``."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise HostCommandFailed(["syncfs", mountpoint], str(e)) from None
    try:
        if _libc().syncfs(fd) != 0:
            raise HostCommandFailed(["syncfs", mountpoint], os.strerror(ctypes.get_errno()))
    finally:
        os.close(fd)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _file_system_ioctl(mountpoint: str, request: int, what: str) -> None:
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise HostCommandFailed([what, mountpoint], str(e)) from None
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as e:
        raise HostCommandFailed([what, mountpoint], str(e)) from None
    finally:
        os.close(fd)
