"""The container image, built here with no registry (scripts/build-image.sh: a debootstrap
base, `docker import`, the Debian package installed by deploy/docker/Dockerfile), runs a node
under the real dockerd that serves volumes to other containers through the Docker plugin; the
image of the previous release is replaced by this one on the same host directories, and the
volumes, their data and their snapshots are all there."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    _env,
    detach_loops,
    leftovers,
    loops_under,
    needs_root,
    unmount_under,
)
from tests.system.conftest import source_of
from tests.system.dockerhost import DockerHost

pytestmark = needs_root()

PLUGIN_SOCKET = Path("/run/docker/plugins/cargohold.sock")
NODE = "cargohold-node"
#: The previous release: what main held when the last session's work landed.
PREVIOUS_RELEASE = "f7cd078c0d868a4b11e7b5217a3b473aebed295c"


class Host:
    """A dockerd, and a directory shared with the node's container (rshared), as the host
    directory /var/lib/cargohold would be."""

    def __init__(self, tmp_path: Path) -> None:
        self.docker = DockerHost(Path("/tmp") / f"chi-{tmp_path.name[-20:]}")
        self.base = tmp_path / "host"
        self.state = self.base / "state"
        self.run = self.base / "run"

    def __enter__(self) -> Host:
        self.state.mkdir(parents=True)
        self.run.mkdir()
        # the root mount tree is private here: the node's mounts reach dockerd only through
        # a shared mount
        subprocess.run(["mount", "--bind", str(self.base), str(self.base)], check=True)
        subprocess.run(["mount", "--make-shared", str(self.base)], check=True)
        self.docker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.docker.docker("rm", "-f", NODE, check=False, timeout=90)
        self.docker.stop()
        loops = loops_under(self.base)
        unmount_under(self.base)
        detach_loops(loops)
        PLUGIN_SOCKET.unlink(missing_ok=True)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The source tree's CLI against the node in the container."""
        done = subprocess.run([sys.executable, "-m", "cargohold.cli", "--host",
                               f"unix://{self.run}/api.sock", *args], capture_output=True,
                              text=True, env=_env(), timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"cargohold {' '.join(args)}: {done.stdout}{done.stderr}\n"
                                 + self.docker.docker("logs", NODE, check=False).stderr)
        return done


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with Host(tmp_path) as made:
        yield made
    assert leftovers(made.base) == {"mounts": [], "loops": [], "processes": []}


@pytest.fixture(scope="session")
def previous_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Debian package of the previous release, built by its own build-deb.sh."""
    base = tmp_path_factory.mktemp("previous-deb")
    source = source_of(PREVIOUS_RELEASE, base)
    done = subprocess.run([str(source / "scripts" / "build-deb.sh"), str(base)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"build-deb.sh failed:\n{done.stdout}{done.stderr}"
    return Path(done.stdout.strip().splitlines()[-1])


def build_image(host: Host, deb: Path, tag: str) -> None:
    built = subprocess.run([str(ROOT / "scripts" / "build-image.sh"), str(deb), tag],
                           capture_output=True, text=True, env=host.docker.env, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    assert built.stdout.strip().splitlines()[-1] == tag


def run_node(host: Host, image: str) -> None:
    """The node's container as the Dockerfile's comment says to run it (--privileged would
    ask for every capability, and this machine's root has no CAP_SYS_RESOURCE to give)."""
    docker = host.docker
    docker.docker("run", "-d", "--name", NODE, "--cap-add", "SYS_ADMIN", "--security-opt",
                  "apparmor=unconfined", "--device", "/dev/fuse", "--device-cgroup-rule",
                  "b 7:* rmw", "--device-cgroup-rule", "c 10:237 rmw", "--network", "host",
                  "--pid", "host", "-v", "/dev:/dev",
                  "-v", "/run/docker/plugins:/run/docker/plugins",
                  "-v", f"{host.run}:/run/cargohold", "-v", f"{host.state}:{host.state}:rshared",
                  image, "node", "--state-dir", str(host.state),
                  "--data-dir", f"{host.state}/disks/1", "--data-dir", f"{host.state}/disks/2")
    deadline = time.monotonic() + 60
    while host.cli("node", "ls", check=False).returncode != 0:
        running = docker.docker("inspect", "-f", "{{.State.Running}}", NODE).stdout.strip()
        assert running == "true" and time.monotonic() < deadline, \
            docker.docker("logs", NODE, check=False).stderr
        time.sleep(0.3)


def stop_node(host: Host) -> None:
    """docker stop: SIGTERM, the node detaches every volume and exits 0."""
    host.docker.docker("stop", "-t", "60", NODE, timeout=90)
    code = host.docker.docker("inspect", "-f", "{{.State.ExitCode}}", NODE).stdout.strip()
    assert code == "0", host.docker.docker("logs", NODE, check=False).stderr


def test_the_image_runs_a_node_that_serves_volumes_to_other_containers(
        debian_package: Path, host: Host) -> None:
    docker = host.docker
    build_image(host, debian_package, "cargohold-test/node:1")
    history = docker.docker("image", "inspect", "cargohold-test/node:1").stdout
    assert json.loads(history)[0]["Config"]["Entrypoint"] == ["/usr/bin/cargohold"]
    busybox = docker.import_busybox()

    run_node(host, "cargohold-test/node:1")

    docker.docker("volume", "create", "-d", "cargohold", "--name", "imgvol", "-o", "size=64M",
                  "-o", "replicas=2")
    docker.docker("run", "--rm", "--network", "none", "-v", "imgvol:/data", busybox, "sh",
                  "-c", "echo from a container > /data/f && sync")
    assert host.cli("volume", "inspect", "imgvol", "-o", "json").stdout.count('"detached"')
    out = docker.docker("run", "--rm", "--network", "none", "-v", "imgvol:/data", busybox,
                        "cat", "/data/f").stdout
    assert out == "from a container\n"
    docker.docker("volume", "rm", "imgvol")
    assert json.loads(host.cli("volume", "ls", "-o", "json").stdout) == []

    stop_node(host)


def test_the_image_of_the_previous_release_is_replaced_with_volumes_and_snapshots_kept(
        debian_package: Path, previous_package: Path, host: Host) -> None:
    docker = host.docker
    build_image(host, previous_package, "cargohold-test/node:previous")
    build_image(host, debian_package, "cargohold-test/node:1")
    busybox = docker.import_busybox()

    run_node(host, "cargohold-test/node:previous")
    docker.docker("volume", "create", "-d", "cargohold", "--name", "kept", "-o", "size=64M",
                  "-o", "replicas=2")
    docker.docker("run", "--rm", "--network", "none", "-v", "kept:/data", busybox, "sh", "-c",
                  "echo before the snapshot > /data/f && sync")
    host.cli("snapshot", "create", "kept@before")
    docker.docker("run", "--rm", "--network", "none", "-v", "kept:/data", busybox, "sh", "-c",
                  "echo after the snapshot > /data/g && sync")
    stop_node(host)
    docker.docker("rm", NODE)

    run_node(host, "cargohold-test/node:1")  # the same host directories
    package = docker.docker("exec", NODE, "dpkg-query", "-W", "-f=${Version}",
                            "cargohold").stdout
    assert package == debian_package.name.split("_")[1]
    out = docker.docker("run", "--rm", "--network", "none", "-v", "kept:/data", busybox,
                        "cat", "/data/f", "/data/g").stdout
    assert out == "before the snapshot\nafter the snapshot\n"
    snapshots = json.loads(host.cli("snapshot", "ls", "kept", "-o", "json").stdout)
    assert [s["name"] for s in snapshots] == ["before"]
    host.cli("volume", "create", "early", "--from", "kept@before", "--wait")
    out = docker.docker("run", "--rm", "--network", "none", "-v", "early:/data", busybox, "sh",
                        "-c", "cat /data/f; test -e /data/g || echo no g").stdout
    assert out == "before the snapshot\nno g\n"
    docker.docker("volume", "rm", "early")
    host.cli("snapshot", "rm", "kept@before")
    docker.docker("volume", "rm", "kept")
    stop_node(host)
