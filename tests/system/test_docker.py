"""The Docker volume plugin against a real dockerd, driven by the real docker CLI."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Node, leftovers, needs_root
from tests.system.dockerhost import DockerHost

pytestmark = [needs_root(), pytest.mark.system,
              pytest.mark.skipif(shutil.which("dockerd") is None, reason="needs dockerd")]

PLUGIN_SOCKET = Path("/run/docker/plugins/cargohold.sock")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Node, DockerHost, str]]:
    node = Node(tmp_path / "node", extra=("--docker-socket", str(PLUGIN_SOCKET)))
    docker = DockerHost(Path("/tmp") / f"chd-{tmp_path.name[-20:]}")
    try:
        node.base.mkdir()
        node.start()
        docker.start()
        image = docker.import_busybox()
        yield node, docker, image
    finally:
        docker.stop()
        node.cleanup()
        PLUGIN_SOCKET.unlink(missing_ok=True)
    assert leftovers(node.base) == {"mounts": [], "loops": [], "processes": []}


def _wait(predicate: object, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_volume_lifecycle_through_docker(cluster: tuple[Node, DockerHost, str]) -> None:
    node, docker, image = cluster
    docker.docker("volume", "create", "-d", "cargohold", "--name", "web", "-o", "size=1G",
                  "-o", "replicas=2", "-o", "fs=xfs")
    [volume] = node.json("volume", "ls")  # type: ignore[misc]
    assert (volume["name"], volume["fs"], volume["replica_count"]) == ("web", "xfs", 2)
    docker.docker("run", "--rm", "--network", "none", "-v", "web:/data", image, "sh", "-c",
                  "echo hi > /data/f")
    assert node.json("volume", "inspect", "web")["state"] == "detached"  # last unmount
    out = docker.docker("run", "--rm", "--network", "none", "-v", "web:/data", image, "cat",
                        "/data/f").stdout
    assert out.strip() == "hi"
    assert "web" in docker.docker("volume", "ls").stdout
    [info] = json.loads(docker.docker("volume", "inspect", "web").stdout)
    assert info["Driver"] == "cargohold" and info["Scope"] == "global"
    assert info["Status"]["size"] == 1 << 30 and info["Status"]["fs"] == "xfs"
    docker.docker("volume", "rm", "web")
    assert node.json("volume", "ls") == []


def test_two_containers_share_a_volume(cluster: tuple[Node, DockerHost, str]) -> None:
    node, docker, image = cluster
    docker.docker("volume", "create", "-d", "cargohold", "--name", "shared", "-o", "size=64M")
    first = docker.docker("run", "-d", "--network", "none", "-v", "shared:/data", image,
                          "sleep", "600").stdout.strip()
    second = docker.docker("run", "-d", "--network", "none", "-v", "shared:/data", image,
                           "sleep", "600").stdout.strip()
    docker.docker("exec", first, "sh", "-c", "echo from-first > /data/x")
    assert docker.docker("exec", second, "cat", "/data/x").stdout.strip() == "from-first"
    refused = docker.docker("volume", "rm", "shared", check=False)
    assert refused.returncode != 0 and "in use" in refused.stderr
    docker.docker("rm", "-f", first)
    assert node.json("volume", "inspect", "shared")["state"] == "attached"  # second holds it
    assert docker.docker("exec", second, "cat", "/data/x").stdout.strip() == "from-first"
    docker.docker("rm", "-f", second)
    assert node.json("volume", "inspect", "shared")["state"] == "detached"
    docker.docker("volume", "rm", "shared")


def test_an_encrypted_volume_through_docker(cluster: tuple[Node, DockerHost, str],
                                           tmp_path: Path) -> None:
    node, docker, image = cluster
    key = tmp_path / "vault.key"
    key.write_text(os.urandom(64).hex() + "\n")
    docker.docker("volume", "create", "-d", "cargohold", "--name", "vault", "-o", "size=64M",
                  "-o", f"key-file={key}")
    docker.docker("volume", "create", "-d", "cargohold", "--name", "vault2", "-o", "size=64M",
                  "-o", "encrypt=true")
    assert node.json("volume", "inspect", "vault")["encryption"]  # type: ignore[index]
    assert node.json("volume", "inspect", "vault2")["encryption"]  # type: ignore[index]
    docker.docker("run", "--rm", "--network", "none", "-v", "vault:/data", image, "sh", "-c",
                  "echo secret-words > /data/f")
    out = docker.docker("run", "--rm", "--network", "none", "-v", "vault:/data", image, "cat",
                        "/data/f").stdout
    assert out.strip() == "secret-words"
    # a clone of a snapshot, through docker: it keeps the source's key
    node.cli("snapshot", "create", "vault@v1")
    docker.docker("run", "--rm", "--network", "none", "-v", "vault:/data", image, "sh", "-c",
                  "echo later > /data/f")
    docker.docker("volume", "create", "-d", "cargohold", "--name", "vault-v1",
                  "-o", "from=vault@v1")
    clone = node.json("volume", "inspect", "vault-v1")
    assert clone["source"] == "vault@v1" and clone["encryption"]  # type: ignore[index]
    out = docker.docker("run", "--rm", "--network", "none", "-v", "vault-v1:/data", image,
                        "cat", "/data/f").stdout
    assert out.strip() == "secret-words"
    refused = docker.docker("volume", "create", "-d", "cargohold", "--name", "bad-clone",
                            "-o", "from=vault@v1", "-o", "fs=xfs", check=False)
    assert refused.returncode != 0 and "from" in refused.stderr
    missing = docker.docker("volume", "create", "-d", "cargohold", "--name", "bad-clone",
                            "-o", "from=vault@nope", check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    node.cli("snapshot", "rm", "vault@v1")
    for name in ("vault", "vault2", "vault-v1"):
        docker.docker("volume", "rm", name)


@pytest.mark.parametrize("option,message", [
    ("encrypt=maybe", "true or false"),
    ("key-file=/nonexistent/key", "No such file"),
    ("size=abc", "Invalid size 'abc'"),
    ("replicas=9", "Invalid replica count '9'"),
    ("colour=blue", "Unknown option 'colour'"),
])
def test_bad_options_give_a_clear_error(cluster: tuple[Node, DockerHost, str], option: str,
                                        message: str) -> None:
    node, docker, _ = cluster
    done = docker.docker("volume", "create", "-d", "cargohold", "--name", "bad", "-o", option,
                         check=False)
    assert done.returncode != 0 and message in done.stderr
    assert node.json("volume", "ls") == []


def test_plugin_restart_keeps_the_mount(cluster: tuple[Node, DockerHost, str]) -> None:
    node, docker, image = cluster
    docker.docker("volume", "create", "-d", "cargohold", "--name", "db", "-o", "size=64M")
    cid = docker.docker("run", "-d", "--network", "none", "-v", "db:/data", image, "sh", "-c",
                        "i=0; while true; do i=$((i+1)); echo $i > /data/n; sync; "
                        "sleep 0.05; done").stdout.strip()
    _wait(lambda: docker.docker("exec", cid, "cat", "/data/n", check=False).stdout.strip()
          not in ("", "1"), what="writes")
    node.kill()  # the plugin (node) dies while the container writes
    before = int(docker.docker("exec", cid, "cat", "/data/n").stdout)
    node.start()
    _wait(lambda: int(docker.docker("exec", cid, "cat", "/data/n").stdout) > before + 10,
          what="writes after the restart")
    docker.docker("rm", "-f", cid)  # Unmount reaches the restarted plugin
    assert node.json("volume", "inspect", "db")["state"] == "detached"
    out = docker.docker("run", "--rm", "--network", "none", "-v", "db:/data", image, "cat",
                        "/data/n").stdout
    assert int(out) > before
    docker.docker("volume", "rm", "db")


def test_mounts_of_a_node_that_stopped_do_not_block_a_remove(
        cluster: tuple[Node, DockerHost, str]) -> None:
    node, docker, image = cluster
    docker.docker("volume", "create", "-d", "cargohold", "--name", "gone", "-o", "size=64M")
    cid = docker.docker("run", "-d", "--network", "none", "-v", "gone:/data", image, "sh",
                        "-c", "echo kept > /data/f && sync && sleep 3600").stdout.strip()
    _wait(lambda: docker.docker("exec", cid, "cat", "/data/f", check=False).stdout == "kept\n",
          what="the write")
    node.stop()  # SIGTERM: the volume is detached under the container
    docker.docker("rm", "-f", cid)  # its Unmount finds no plugin: Docker forgets it
    node.start()  # the mount reference of a volume not attached here is dropped
    out = docker.docker("run", "--rm", "--network", "none", "-v", "gone:/data", image, "cat",
                        "/data/f").stdout
    assert out == "kept\n"
    docker.docker("volume", "rm", "gone")
    assert node.json("volume", "ls") == []


def test_swarm_service_keeps_data_across_a_rolling_update(
        cluster: tuple[Node, DockerHost, str]) -> None:
    node, docker, image = cluster
    image2 = docker.import_busybox("2")
    docker.docker("volume", "ls")  # Swarm lists a legacy plugin once dockerd activated it
    docker.docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    docker.docker("service", "create", "--detach", "--name", "www", "--no-resolve-image",
                  "--endpoint-mode", "dnsrr", "--restart-delay", "0s",
                  "--mount", "type=volume,source=svc,target=/data,volume-driver=cargohold,"
                  "volume-opt=size=64M", image, "sh", "-c",
                  "date >> /data/log; sync; sleep 600")

    def lines() -> int:
        ids = docker.docker("ps", "-q", "--filter", "label=com.docker.swarm.service.name=www",
                            check=False).stdout.split()
        if len(ids) != 1:
            return 0
        out = docker.docker("exec", ids[0], "cat", "/data/log", check=False).stdout
        return len(out.splitlines())

    _wait(lambda: lines() == 1, what="the first task")
    docker.docker("service", "update", "--detach", "--no-resolve-image", "--image", image2,
                  "www")
    _wait(lambda: lines() == 2, what="the updated task to see the first task's data")
    docker.docker("service", "rm", "www")
    _wait(lambda: node.json("volume", "inspect", "svc")["state"] == "detached",
          what="the volume to be released")
    node.cli("volume", "rm", "svc")
