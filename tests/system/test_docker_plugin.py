"""cargohold as a Docker managed plugin (scripts/build-plugin.sh) under the real dockerd:
pushed to a registry on loopback (Debian's docker-registry), installed, used from containers,
disabled and enabled with a volume in use, and upgraded to a new build without losing data."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    detach_loops,
    free_port,
    loops_under,
    needs_root,
    stop_process,
)
from tests.system.dockerhost import DockerHost

pytestmark = needs_root()

ALIAS = "cargohold"


class Registry:
    """Debian's docker-registry (the distribution registry) on 127.0.0.1, plain HTTP, which
    dockerd allows for loopback addresses."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.address = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Registry:
        self.base.mkdir(parents=True)
        config = self.base / "config.yml"
        config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
                          f"{self.base / 'data'}\nhttp:\n  addr: {self.address}\n")
        with open(self.base / "registry.log", "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while subprocess.run(["curl", "-sf", f"http://{self.address}/v2/"],
                             capture_output=True).returncode != 0:
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                (self.base / "registry.log").read_text()
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def docker(tmp_path: Path) -> Iterator[DockerHost]:
    host = DockerHost(Path("/tmp") / f"chp-{tmp_path.name[-20:]}")
    try:
        host.start()
        yield host
    finally:
        ids = host.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            host.docker("rm", "-f", *ids, check=False)
        host.docker("volume", "rm", "-f", "pv", check=False)
        host.docker("plugin", "disable", "-f", ALIAS, check=False, timeout=120)
        host.docker("plugin", "rm", "-f", ALIAS, check=False)
        loops = loops_under(host.base)
        host.stop()  # and unmounts what is left under its directory
        detach_loops(loops)


def build_of(docker: DockerHost, plugin: str) -> str:
    """Which build a plugin's root file system is (build-plugin.sh writes it there)."""
    [info] = json.loads(docker.docker("plugin", "inspect", plugin).stdout)
    marker = docker.data_root / "plugins" / info["Id"] / "rootfs/etc/cargohold/plugin-build"
    return marker.read_text()


def run(docker: DockerHost, image: str, script: str) -> str:
    return docker.docker("run", "--rm", "--network", "none", "-v", "pv:/data", image, "sh",
                         "-c", script).stdout


def test_the_managed_plugin_installs_serves_and_upgrades_without_losing_data(
        debian_package: Path, docker: DockerHost, tmp_path: Path) -> None:
    built = subprocess.run([str(ROOT / "scripts" / "build-image.sh"), str(debian_package),
                            "cargohold-test/node:1"], capture_output=True, text=True,
                           env=docker.env, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    busybox = docker.import_busybox()
    with Registry(tmp_path / "registry") as registry:
        remote = f"{registry.address}/cargohold"
        builds = {}  # each build's marker
        for tag in ("1", "2"):  # two builds, pushed as a release and its successor
            made = subprocess.run([str(ROOT / "scripts" / "build-plugin.sh"),
                                   "cargohold-test/node:1", f"{remote}:{tag}"],
                                  capture_output=True, text=True, env=docker.env, timeout=900)
            assert made.returncode == 0, made.stdout + made.stderr
            builds[tag] = build_of(docker, f"{remote}:{tag}")
            docker.docker("plugin", "push", f"{remote}:{tag}", timeout=600)
            docker.docker("plugin", "rm", f"{remote}:{tag}")

        docker.docker("plugin", "install", "--grant-all-permissions", "--alias", ALIAS,
                      f"{remote}:1", timeout=600)
        [plugin] = json.loads(docker.docker("plugin", "inspect", ALIAS).stdout)
        assert plugin["Enabled"] and plugin["PluginReference"] == f"{remote}:1"
        assert builds["1"] != builds["2"] and build_of(docker, ALIAS) == builds["1"]

        docker.docker("volume", "create", "-d", ALIAS, "--name", "pv", "-o", "size=64M",
                      "-o", "replicas=2")
        run(docker, busybox, "echo written by release 1 > /data/one && sync")
        assert run(docker, busybox, "cat /data/one") == "written by release 1\n"

        # Docker refuses to disable a plugin while volumes of it exist; a forced disable
        # stops the node, which detaches the volume in use with every replica flushed
        docker.docker("run", "-d", "--name", "user", "--network", "none", "-v", "pv:/data",
                      busybox, "sh", "-c", "echo in use > /data/two && sync && sleep 3600")
        time.sleep(1)
        refused = docker.docker("plugin", "disable", ALIAS, check=False)
        assert refused.returncode != 0 and "in use" in refused.stderr
        docker.docker("plugin", "disable", "-f", ALIAS, timeout=120)
        docker.docker("rm", "-f", "user")
        docker.docker("plugin", "enable", ALIAS, timeout=120)
        assert run(docker, busybox, "cat /data/one /data/two") == \
            "written by release 1\nin use\n"

        docker.docker("plugin", "disable", "-f", ALIAS, timeout=120)  # volume pv exists
        # a new tag is "another image" to the CLI, which asks first: say yes up front
        docker.docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check",
                      ALIAS, f"{remote}:2", timeout=600)
        docker.docker("plugin", "enable", ALIAS, timeout=120)
        assert build_of(docker, ALIAS) == builds["2"]
        assert "pv" in docker.docker("volume", "ls", "-q").stdout
        assert run(docker, busybox, "cat /data/one /data/two") == \
            "written by release 1\nin use\n"
        docker.docker("volume", "rm", "pv")
