"""The Debian package on a host whose PID 1 is systemd, as an operator meets it: a Debian 12
booted with its own systemd in a container under the real dockerd (the base made by
debootstrap and ``docker import``; no registry). ``apt install ./cargohold_*.deb && systemctl
start cargohold`` gives a working node with the shipped settings; installing a newer build
hands the running node over through systemd (the postinst's ``systemctl kill`` SIGUSR2, then
start) with the volume attached throughout; ``apt remove`` then ``systemctl stop`` detaches
cleanly, every replica still in sync; a reinstall finds the volume and its data.

The older build is this tree's package under a lower version: what it exercises is the
package's systemd path, which test_debian_package.py cannot (no systemd as PID 1 there); the
upgrade of older code is that file's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_root
from tests.system.dockerhost import DockerHost

pytestmark = needs_root()

#: Debian's packages the host has: what cargohold's package depends on and recommends, and
#: systemd as PID 1.
PACKAGES = "systemd,systemd-sysv,logrotate,python3,fuse3,util-linux,mount,e2fsprogs," \
           "xfsprogs,libssl3"
IMAGE = "cargohold-test/systemd-host:bookworm"
HOST = "cargohold-systemd-host"
STATE = "/var/lib/cargohold"
FUSECTL = Path("/sys/fs/fuse/connections")


@pytest.fixture(scope="module")
def systemd_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tarball of Debian 12 with systemd, made from Debian's packages."""
    base = tmp_path_factory.mktemp("systemd-host")
    rootfs = base / "rootfs"
    done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}",
                           "bookworm", str(rootfs),
                           os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # no consoles in a container: gettys would open the host's ttys through the /dev bind
    (rootfs / "etc/systemd/system/getty.target").symlink_to("/dev/null")
    tarball = base / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
    shutil.rmtree(rootfs)
    return tarball


def versioned(deb: Path, version: str, out: Path) -> Path:
    """``deb`` repacked with another version."""
    tree = out / f"tree-{version}"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text("".join(f"Version: {version}\n" if line.startswith("Version:") else line
                               for line in control.read_text().splitlines(keepends=True)))
    made = out / f"cargohold_{version}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", "-Zxz", "-z0", str(tree),
                    str(made)], check=True, capture_output=True)
    shutil.rmtree(tree)
    return made


class SystemdHost:
    """A container whose PID 1 is systemd, with what a cargohold node needs of the host
    (CAP_SYS_ADMIN, /dev/fuse, loop devices) and a folder of packages at /debs."""

    def __init__(self, base: Path, rootfs: Path, debs: Path) -> None:
        self.docker = DockerHost(Path("/tmp") / f"csd-{base.name[-20:]}")
        self.rootfs = rootfs
        self.debs = debs
        self.state = base / "state"  # the host's /var/lib/cargohold
        self.loops = engine_loops()  # the host's before: a loop device made in the container
        # names its engine's file as "/volume" (the path inside the FUSE mount)

    def __enter__(self) -> SystemdHost:
        self.state.mkdir()
        self.docker.start()
        self.docker.docker("import", str(self.rootfs), IMAGE, timeout=300)
        self.docker.docker(
            "run", "-d", "--name", HOST, "--cap-add", "SYS_ADMIN", "--security-opt",
            "apparmor=unconfined", "--security-opt", "seccomp=unconfined", "--network", "none",
            "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
            "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", "--device", "/dev/fuse",
            "--device-cgroup-rule", "b 7:* rmw", "--device-cgroup-rule", "c 10:237 rmw",
            "-v", "/dev:/dev", "-v", f"{self.debs}:/debs:ro", "-v", f"{self.state}:{STATE}",
            "-e", "container=docker", IMAGE, "/lib/systemd/systemd")
        deadline = time.monotonic() + 60
        while self.sh("systemctl is-system-running", check=False).stdout.strip() not in (
                "running", "degraded"):
            assert time.monotonic() < deadline, self.sh("systemctl --failed", check=False)
            time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.sh("systemctl stop cargohold", check=False)  # detaches what is attached
            self._abort_fuse()
            self.docker.docker("rm", "-f", HOST, check=False, timeout=90)
        finally:
            self.docker.stop()
            for device in engine_loops() - self.loops:
                subprocess.run(["losetup", "-d", device], capture_output=True)
            shutil.rmtree(self.state, ignore_errors=True)

    def _abort_fuse(self) -> None:
        """Abort the FUSE connections of engines still running in the container. Killed with
        its mounts still there, the last engine would flush the file systems on them while its
        own FUSE device waits to be closed, for ever: the container would never end."""
        pid = self.docker.docker("inspect", "-f", "{{.State.Pid}}", HOST,
                                 check=False).stdout.strip()
        if not pid or pid == "0":
            return
        devices = [line.split()[2] for line in
                   Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                   if line.split(" - ")[1].startswith("fuse")]
        if not devices:
            return
        mounted = any(FUSECTL.iterdir())
        if not mounted:
            subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], check=True)
        try:
            for device in devices:
                abort = FUSECTL / device.split(":")[1] / "abort"
                if abort.exists():
                    abort.write_text("1")
        finally:
            if not mounted:
                subprocess.run(["umount", str(FUSECTL)], check=False)

    def sh(self, script: str, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = self.docker.docker("exec", HOST, "sh", "-c", script, check=False,
                                  timeout=timeout)
        if check:
            assert done.returncode == 0, (
                f"{script}: {done.stdout}{done.stderr}\n"
                + self.docker.docker("exec", HOST, "journalctl", "-u", "cargohold",
                                     "--no-pager", "-n", "40", check=False).stdout)
        return done

    def volume(self, name: str) -> dict[str, object]:
        described = json.loads(self.sh(f"cargohold volume inspect {name} -o json").stdout)
        assert isinstance(described, dict)
        return described

    def main_pid(self) -> str:
        return self.sh("systemctl show -p MainPID --value cargohold").stdout.strip()

    def wait_for_node(self) -> None:
        deadline = time.monotonic() + 60
        while self.sh("cargohold node ls", check=False).returncode != 0:
            assert time.monotonic() < deadline, self.sh(
                "systemctl status cargohold --no-pager", check=False).stdout
            time.sleep(0.3)


def engine_loops() -> set[str]:
    """The host's loop devices whose file is an engine's seen from another mount namespace."""
    listed = subprocess.run(["losetup", "-n", "-l", "-O", "NAME,BACK-FILE"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return {line.split()[0] for line in listed if line.split()[1:] == ["/volume"]}


def in_sync(volume: dict[str, object]) -> list[tuple[str, float]]:
    """The volume's replicas in sync, with the time each has been so since."""
    replicas = volume["replicas"]
    assert isinstance(replicas, list)
    return [(r["server"], r["since"]) for r in replicas if r["state"] == "in_sync"]


@pytest.fixture
def host(tmp_path: Path, systemd_rootfs: Path, debian_package: Path) -> Iterator[SystemdHost]:
    debs = tmp_path / "debs"
    debs.mkdir()
    version = subprocess.run(["dpkg-deb", "-f", str(debian_package), "Version"],
                             capture_output=True, text=True, check=True).stdout.strip()
    versioned(debian_package, f"{version}~older", debs).rename(debs / "older.deb")
    shutil.copy(debian_package, debs / "newer.deb")
    with SystemdHost(tmp_path, systemd_rootfs, debs) as made:
        yield made


def test_apt_install_and_systemctl_start_give_a_node_that_upgrades_and_stops_cleanly(
        host: SystemdHost) -> None:
    said = host.sh("apt-get install -y -q /debs/older.deb").stdout  # no network: nothing
    assert "list this host's disks in /etc/cargohold/node.toml" in said  # fetched
    assert host.sh("systemctl is-enabled cargohold").stdout.strip() == "enabled"
    host.sh("systemctl start cargohold")  # with the shipped settings, as they are
    host.wait_for_node()
    host.sh("cargohold volume create sysvol --size 64M --replicas 2")
    mountpoint = host.sh("cargohold volume attach sysvol").stdout.strip()
    host.sh(f"echo from the older build > {mountpoint}/a && sync")
    engine = host.sh(f"cat {STATE}/engines/sysvol/engine.pid").stdout.strip()
    replicas = in_sync(host.volume("sysvol"))
    assert len(replicas) == 2
    older_node = host.main_pid()

    # the upgrade: postinst stops the old node alone (SIGUSR2 through systemctl kill), then
    # starts the new one, which adopts the engine and the data servers
    host.sh("apt-get install -y -q /debs/newer.deb")
    assert host.sh("systemctl is-active cargohold").stdout.strip() == "active"
    assert host.main_pid() not in (older_node, "0")
    assert host.sh(f"cat {STATE}/engines/sysvol/engine.pid").stdout.strip() == engine
    host.wait_for_node()
    assert host.volume("sysvol")["state"] == "attached"
    host.sh(f"echo after the upgrade > {mountpoint}/b && sync")

    # removed, the package leaves the node running; systemd still stops it as the unit says
    said = host.sh("apt-get remove -y -q cargohold").stdout
    assert "keeps running" in said
    assert host.sh("systemctl is-active cargohold").stdout.strip() == "active"
    host.sh(f"echo after the removal > {mountpoint}/c && sync")
    host.sh("systemctl stop cargohold")
    journal = host.sh("journalctl -u cargohold --no-pager").stdout
    assert "detached sysvol" in journal
    assert host.sh(f"mountpoint -q {mountpoint}", check=False).returncode != 0
    assert host.sh("grep -l 'cargohold[.]daemons[.]engine' /proc/[0-9]*/cmdline",
                   check=False).stdout == ""  # no engine left

    host.sh("apt-get install -y -q /debs/newer.deb")
    host.sh("systemctl start cargohold")
    host.wait_for_node()
    # the stop detached it with every replica in sync since its creation
    assert in_sync(host.volume("sysvol")) == replicas
    mountpoint = host.sh("cargohold volume attach sysvol").stdout.strip()
    assert host.sh(f"cat {mountpoint}/a {mountpoint}/b {mountpoint}/c").stdout == (
        "from the older build\nafter the upgrade\nafter the removal\n")
    host.sh("cargohold volume detach sysvol")
    host.sh("apt-get remove -y -q cargohold")  # running: the unit is kept in /run
    host.sh("systemctl stop cargohold")
    said = host.sh("apt-get purge -y -q cargohold").stdout
    assert "Left in place" in said and f"{STATE}/disks/1 (replicas" in said
    assert host.sh("test -e /etc/cargohold", check=False).returncode != 0
    assert host.sh("systemctl show -p LoadState --value cargohold").stdout.strip() == \
        "not-found"  # no copy of the unit left in /run either
    assert engine_loops() == host.loops  # no loop device left by the node
