"""The Debian package, built by scripts/build-deb.sh and installed on this machine with apt:
a node run as its systemd unit runs it, removal leaves attached volumes working until the
node stops, purge says what it leaves, and an upgrade from the previous release (a pip
install of the last commit before the package) keeps volumes attached throughout.

This machine has no systemd as PID 1: the tests run the unit's ExecStart themselves
(test_package_under_systemd.py runs the package under systemd, in a container).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Node, _env, needs_root
from tests.system.conftest import source_of

pytestmark = needs_root()

#: The last commit before the package existed: "the previous release" an upgrade starts from.
PREVIOUS_RELEASE = "72d27b6361bc549d5a448251d3090d9f98f52b0e"
UNIT = Path("/lib/systemd/system/cargohold.service")
SETTINGS = Path("/etc/cargohold/node.toml")
STATE = Path("/var/lib/cargohold")


def apt(*args: str) -> str:
    done = subprocess.run(["apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold",
                           *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert done.returncode == 0, f"apt-get {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def installed() -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "cargohold"],
                          capture_output=True, text=True)
    return "installed" in done.stdout and "not-installed" not in done.stdout


@pytest.fixture(scope="session")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cargohold`` of the previous release, pip-installed in a venv of its own."""
    base = tmp_path_factory.mktemp("previous")
    source = source_of(PREVIOUS_RELEASE, base)
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(base / "venv")], check=True)
    done = subprocess.run([str(base / "venv" / "bin" / "pip"), "install", "-q", str(source)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return base / "venv" / "bin" / "cargohold"


@pytest.fixture
def clean_package() -> Iterator[None]:
    """No cargohold package before the test, none after it (purged, whatever happened)."""
    state_existed = STATE.exists()
    if installed():
        apt("purge", "cargohold")
    try:
        yield
    finally:
        subprocess.run(["apt-get", "-y", "-q", "purge", "cargohold"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
        if not state_existed and STATE.exists() and not any(STATE.iterdir()):
            STATE.rmdir()


class InstalledNode(Node):
    """A node run by an installed cargohold, not by this source tree."""

    def __init__(self, base: Path, program: str, **kwargs: object) -> None:
        super().__init__(base, **kwargs)  # type: ignore[arg-type]
        self.program = [program]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
        return {**env, **self.env}


class PackagedNode(InstalledNode):
    """The package's node, run as its systemd unit runs it, with this test's settings written
    into /etc/cargohold/node.toml (as an operator lists the host's disks there)."""

    def __init__(self, base: Path) -> None:
        super().__init__(base, "/usr/bin/cargohold", data_servers=2)

    def command(self) -> list[str]:
        settings = [f'name = "{self.name}"', f'state-dir = "{self.state}"',
                    f'api = ["{self.host}"]', 'docker-socket = "none"',
                    "data-dir = [" + ", ".join(f'"{d}"' for d in self.data_dirs) + "]"]
        SETTINGS.write_text("\n".join(settings) + "\n")
        [start] = [line for line in UNIT.read_text().splitlines()
                   if line.startswith("ExecStart=")]
        return shlex.split(start.removeprefix("ExecStart="))


def attached_engine(node: Node, name: str) -> int:
    [pid] = [int(p.read_text()) for p in node.state.glob(f"engines/{name}/engine.pid")]
    assert Path(f"/proc/{pid}").exists()
    return pid


def write(mountpoint: Path, name: str, data: bytes) -> None:
    with open(mountpoint / name, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_the_package_installs_runs_and_leaves_volumes_attached_when_removed(
        debian_package: Path, clean_package: None, tmp_path: Path) -> None:
    node = PackagedNode(tmp_path)
    try:
        said = apt("install", str(debian_package))
        assert "list this host's disks in /etc/cargohold/node.toml" in said
        assert Path("/opt/cargohold/bin/python3").resolve() == Path("/usr/bin/python3.11")
        version = subprocess.run(["/usr/bin/cargohold", "--version"], capture_output=True,
                                 text=True, check=True, env=node.environment())
        assert version.stdout.startswith("cargohold ")
        manual = subprocess.run(["man", "-P", "cat", "cargohold"], capture_output=True,
                                text=True, env={**os.environ, "MANWIDTH": "80"})
        assert manual.returncode == 0, manual.stderr
        assert "cargohold volume create" in manual.stdout  # /usr/share/man/man1/cargohold.1.gz
        verified = subprocess.run(["systemd-analyze", "verify", str(UNIT)],
                                  capture_output=True, text=True)  # works without systemd up
        assert verified.returncode == 0, verified.stdout + verified.stderr
        conffiles = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", "cargohold"],
                                   capture_output=True, text=True, check=True).stdout
        assert str(SETTINGS) in conffiles and "/etc/logrotate.d/cargohold" in conffiles
        shipped = tomllib.loads(SETTINGS.read_text())  # the default settings are valid
        assert shipped["state-dir"] == str(STATE) and len(shipped["data-dir"]) == 3
        checked = subprocess.run(["/usr/bin/cargohold", "node", "--config", str(SETTINGS),
                                  "--overprovision", "-1"], capture_output=True, text=True,
                                 env=node.environment())  # read, then refused for the flag
        assert "overprovision: Input should be greater than or equal to 0" in checked.stderr

        node.start()
        node.cli("volume", "create", "pkgvol", "--size", "64M", "--replicas", "2")
        mountpoint = Path(node.cli("volume", "attach", "pkgvol").stdout.strip())
        write(mountpoint, "before", b"written before the package was removed\n")

        # the package's logrotate file rotates the data servers' logs, which stay open
        rotation = tmp_path / "logrotate.conf"
        rotation.write_text(Path("/etc/logrotate.d/cargohold").read_text()
                            .replace(str(STATE), str(node.state)))
        log = node.state / "logs" / "dataserver-0.log"
        assert log.stat().st_size > 0
        subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"),
                        str(rotation)], check=True, capture_output=True)
        assert (node.state / "logs" / "dataserver-0.log.1").stat().st_size > 0
        assert log.exists() and log.stat().st_size == 0  # copied and truncated

        said = apt("remove", "cargohold")
        assert "keeps running" in said
        assert not Path("/usr/bin/cargohold").exists()
        assert node.proc is not None and node.proc.poll() is None
        write(mountpoint, "after", b"written after the package was removed\n")
        assert (mountpoint / "before").read_bytes().startswith(b"written before")

        node.stop()  # the node still detaches what it attached, from the files it loaded
        assert node.proc is not None and node.proc.returncode == 0, node.logs()
        assert not mountpoint.is_mount()
        assert not node.engine_pids()
        assert not any(Path(f"/proc/{p}").exists() for p in node.dataserver_pids())

        said = apt("purge", "cargohold")
        assert "Left in place" in said  # where the settings put state and replicas:
        assert f"{node.state} (metadata" in said and f"{node.data_dirs[1]} (replicas" in said
        assert not SETTINGS.exists() and not Path("/opt/cargohold").exists()
    finally:
        node.cleanup()


def test_an_upgrade_from_the_previous_release_keeps_volumes_attached(
        debian_package: Path, previous_release: Path, clean_package: None,
        tmp_path: Path) -> None:
    old = InstalledNode(tmp_path, str(previous_release), data_servers=2)
    new = PackagedNode(tmp_path)  # the same state, data directories and API socket
    try:
        old.start()
        old.cli("volume", "create", "keep", "--size", "64M", "--replicas", "2")
        mountpoint = Path(old.cli("volume", "attach", "keep").stdout.strip())
        write(mountpoint, "a", b"from the previous release\n")
        engine = attached_engine(old, "keep")

        said = apt("install", str(debian_package))
        assert "list this host's disks" in said  # a first install of the package
        assert old.proc is not None
        old.proc.send_signal(signal.SIGUSR2)  # the old node has no handler: it just ends
        old.proc.wait(timeout=30)
        write(mountpoint, "b", b"with no node running\n")  # the engine serves on

        new.start()  # adopts the engine and the data servers
        volumes = new.json("volume", "ls")
        assert isinstance(volumes, list) and [v["name"] for v in volumes] == ["keep"]
        assert volumes[0]["attachment"]["node"] == new.name
        assert attached_engine(new, "keep") == engine
        write(mountpoint, "c", b"with the new node\n")

        assert new.proc is not None
        new.proc.send_signal(signal.SIGUSR2)  # the new node hands over on purpose: exit 0
        assert new.proc.wait(timeout=60) == 0, new.logs()
        assert mountpoint.is_mount() and attached_engine(new, "keep") == engine
        new.start()

        new.cli("volume", "detach", "keep")  # the old engine, stopped by the new node
        assert not mountpoint.is_mount()
        mountpoint = Path(new.cli("volume", "attach", "keep").stdout.strip())
        assert attached_engine(new, "keep") != engine  # the package's own engine now
        assert (mountpoint / "a").read_bytes() == b"from the previous release\n"
        assert (mountpoint / "b").read_bytes() == b"with no node running\n"
        assert (mountpoint / "c").read_bytes() == b"with the new node\n"
        new.cli("volume", "detach", "keep")
        new.stop()
        assert new.proc.returncode == 0, new.logs()
    finally:
        new.cleanup()
        old.cleanup()
        shutil.rmtree(tmp_path / "state", ignore_errors=True)
