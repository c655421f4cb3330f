"""The container image, built here with no registry (scripts/build-image.sh: a debootstrap
base, `docker import`, the Debian package installed by deploy/docker/Dockerfile), runs a node
under the real dockerd that serves volumes to other containers through the Docker plugin."""

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
from tests.system.dockerhost import DockerHost

pytestmark = needs_root()

PLUGIN_SOCKET = Path("/run/docker/plugins/cargohold.sock")
NODE = "cargohold-node"


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


def test_the_image_runs_a_node_that_serves_volumes_to_other_containers(
        debian_package: Path, host: Host) -> None:
    docker = host.docker
    built = subprocess.run([str(ROOT / "scripts" / "build-image.sh"), str(debian_package),
                            "cargohold-test/node:1"], capture_output=True, text=True,
                           env=docker.env, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    assert built.stdout.strip().splitlines()[-1] == "cargohold-test/node:1"
    history = docker.docker("image", "inspect", "cargohold-test/node:1").stdout
    assert json.loads(history)[0]["Config"]["Entrypoint"] == ["/usr/bin/cargohold"]
    busybox = docker.import_busybox()

    # what the Dockerfile's comment says to run (--privileged would ask for every capability,
    # and this machine's root has no CAP_SYS_RESOURCE to give)
    docker.docker("run", "-d", "--name", NODE, "--cap-add", "SYS_ADMIN", "--security-opt",
                  "apparmor=unconfined", "--device", "/dev/fuse", "--device-cgroup-rule",
                  "b 7:* rmw", "--device-cgroup-rule", "c 10:237 rmw", "--network", "host",
                  "--pid", "host", "-v", "/dev:/dev",
                  "-v", "/run/docker/plugins:/run/docker/plugins",
                  "-v", f"{host.run}:/run/cargohold", "-v", f"{host.state}:{host.state}:rshared",
                  "cargohold-test/node:1", "node", "--state-dir", str(host.state),
                  "--data-dir", f"{host.state}/disks/1", "--data-dir", f"{host.state}/disks/2")
    deadline = time.monotonic() + 60
    while host.cli("node", "ls", check=False).returncode != 0:
        running = docker.docker("inspect", "-f", "{{.State.Running}}", NODE).stdout.strip()
        assert running == "true" and time.monotonic() < deadline, \
            docker.docker("logs", NODE, check=False).stderr
        time.sleep(0.3)

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

    docker.docker("stop", "-t", "60", NODE, timeout=90)  # SIGTERM: the node stops cleanly
    assert docker.docker("inspect", "-f", "{{.State.ExitCode}}", NODE).stdout.strip() == "0"
