"""Two cargohold clusters on this machine for the tests between clusters: each one node
with its own metadata (SQLite), CA and admin token, its API on HTTPS on loopback."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import Node, _env, leftovers, tcp_node

MIB = 1 << 20
ADMIN = "admin-secret-0123456789abcdef"


@dataclass
class Cluster:
    name: str
    node: Node
    port: int
    ca: Path
    token: Path

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.node.cli(*args, check=check)

    def json(self, *args: str) -> Any:
        return self.node.json(*args)

    def volume(self, name: str) -> dict[str, Any]:
        return dict(self.json("volume", "inspect", name))

    def add_remote(self, other: Cluster) -> None:
        self.cli("remote", "add", other.name, "--endpoint", f"https://127.0.0.1:{other.port}",
                 "--token-file", str(other.token), "--ca", str(other.ca))


def cluster(base: Path, name: str) -> Cluster:
    node, port = tcp_node(base, f"ops admin {ADMIN}\n")
    node.start()
    token = base / "admin-token"
    token.write_text(ADMIN + "\n")
    token.chmod(0o600)
    return Cluster(name, node, port, node.state / "tls" / "ca.crt", token)


@contextmanager
def two_clusters(base: Path) -> Iterator[tuple[Cluster, Cluster]]:
    """Clusters ``prod`` and ``dr``, ``dr`` added to ``prod`` as a remote; everything they
    started is stopped after, and checked to be gone."""
    made: list[Cluster] = []
    try:
        made.append(cluster(base / "prod", "prod"))
        made.append(cluster(base / "dr", "dr"))
        made[0].add_remote(made[1])
        yield made[0], made[1]
    finally:
        for each in made:
            each.node.cleanup()
        assert leftovers(base) == {"mounts": [], "loops": [], "processes": []}


def until(check: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def attach(cluster: Cluster, name: str) -> Path:
    return Path(cluster.json("volume", "attach", name)["attachment"]["mountpoint"])


def write_fails(path: Path) -> bool:
    """Whether writing and fsyncing a file on a fenced volume fails (EIO)."""
    code = ("import os,sys\n"
            "try:\n"
            f"    fd = os.open({str(path)!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
            "    os.write(fd, os.urandom(1 << 20)); os.fsync(fd); os.close(fd)\n"
            "except OSError as e:\n"
            "    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                          env=_env())
    return done.returncode == 3


def metrics(cluster: Cluster) -> str:
    context = ssl.create_default_context(cafile=str(cluster.ca))
    request = urllib.request.Request(f"https://127.0.0.1:{cluster.port}/metrics",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(request, context=context, timeout=30) as answer:
        return str(answer.read().decode())


def acked_read_back(path: Path, acked: dict[int, bytes]) -> None:
    """Every 4 KiB block a ``LiveWriter`` got acknowledged reads back from ``path`` (the same
    file on another copy of the volume), even when the writer ended in an error (fenced)."""
    content = path.read_bytes()
    for block, data in acked.items():
        assert content[block * 4096:(block + 1) * 4096] == data, block
