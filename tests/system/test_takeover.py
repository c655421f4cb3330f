"""Two nodes sharing one metadata store: takeover waits for the owner's lease; epochs fence.

Both nodes run on this machine (sharing the SQLite file, as several node processes on one
host may), so a "dead host" here is a node process killed with SIGKILL; its engine is left
running on purpose, as a zombie writer that must be fenced off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Node, credentials, leftovers, needs_root

pytestmark = [needs_root(), pytest.mark.system]

LEASE_TTL = "2"


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    meta = f"sqlite://{tmp_path / 'meta.db'}"
    nodes = []
    try:
        for name in ("hosta", "hostb"):
            base = tmp_path / name
            base.mkdir()
            node = Node(base, data_servers=1, name=name,
                        extra=("--metadata", meta, "--lease-ttl", LEASE_TTL,
                               *credentials(tmp_path, name)))
            nodes.append(node)
            node.start()
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            node.cleanup()


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def test_takeover_after_the_owner_dies_fences_the_old_writer(two_nodes: tuple[Node, Node]) -> None:
    a, b = two_nodes
    a.cli("volume", "create", "v", "--size", "64M", "--replicas", "2")
    replicas = a.json("volume", "inspect", "v")["replicas"]
    assert {r["node"] for r in replicas} == {"hosta", "hostb"}  # distinct nodes
    mount_a = Path(a.cli("volume", "attach", "v").stdout.strip())
    _write(mount_a / "x", "from-a")

    refused = b.cli("volume", "attach", "v", check=False)  # A is alive: never two writers
    assert refused.returncode == 4 and "attached on node 'hosta'" in refused.stderr

    a.kill()  # A's node dies; its engine (the zombie) still has the volume mounted
    [info] = [n for n in b.json("node", "ls") if n["name"] == "hosta"]
    assert info["lease"] == "alive"  # not yet expired
    deadline = time.monotonic() + 30
    while True:
        done = b.cli("volume", "attach", "v", check=False)
        if done.returncode == 0:
            break
        assert done.returncode == 4, done.stderr
        assert time.monotonic() < deadline, "takeover did not happen after the lease expired"
        time.sleep(0.2)
    mount_b = Path(done.stdout.strip())
    assert (mount_b / "x").read_text() == "from-a"  # every acknowledged write is there
    inspected = b.json("volume", "inspect", "v")
    assert inspected["attachment"]["node"] == "hostb" and inspected["epoch"] == 2
    # Lease gone, and not seen for the staleness window (lease TTL or 3 checks, whichever is
    # longer): at most a second or two after the takeover, A counts as down.
    deadline = time.monotonic() + 10
    while [n["health"] for n in b.json("node", "ls") if n["name"] == "hosta"] != ["down"]:
        assert time.monotonic() < deadline, "the dead node is not reported down"
        time.sleep(0.2)
    _write(mount_b / "x", "from-b")

    with pytest.raises(OSError):  # the zombie's writes are refused by the data servers
        _write(mount_a / "zombie", "stale write")
    assert "fenced" in (a.state / "engines" / "v" / "engine.log").read_text()

    b.cli("volume", "detach", "v")
    mount_b = Path(b.cli("volume", "attach", "v").stdout.strip())
    assert (mount_b / "x").read_text() == "from-b"
    assert not (mount_b / "zombie").exists()
    b.cli("volume", "detach", "v")

    a.start()  # A comes back: it finds the volume attached elsewhere and removes its leftovers
    assert "removed leftovers of v" in a.logs()
    assert leftovers(a.base)["mounts"] == [] and leftovers(a.base)["loops"] == []


def test_force_detach_is_refused_while_the_owner_lives_then_fences(
        two_nodes: tuple[Node, Node]) -> None:
    a, b = two_nodes
    a.cli("volume", "create", "w", "--size", "64M", "--replicas", "2")
    mount_a = Path(a.cli("volume", "attach", "w").stdout.strip())
    _write(mount_a / "y", "kept")

    refused = b.cli("volume", "detach", "w", "--force", check=False)
    assert refused.returncode == 4 and "lease is alive" in refused.stderr
    assert b.json("volume", "inspect", "w")["attachment"]["node"] == "hosta"  # unchanged

    a.kill()
    deadline = time.monotonic() + 30
    while b.cli("volume", "detach", "w", "--force", check=False).returncode != 0:
        assert time.monotonic() < deadline, "force detach refused after the lease expired"
        time.sleep(0.2)
    released = b.json("volume", "inspect", "w")
    assert released["attachment"] is None and released["state"] == "detached"
    assert released["epoch"] == 2
    with pytest.raises(OSError):  # fenced at release, before anyone attaches it again
        _write(mount_a / "zombie", "stale write")

    mount_b = Path(b.cli("volume", "attach", "w").stdout.strip())
    assert (mount_b / "y").read_text() == "kept"
    assert not (mount_b / "zombie").exists()
    b.cli("volume", "detach", "w")
    b.cli("volume", "rm", "w")
    a.start()
    assert leftovers(a.base)["mounts"] == [] and leftovers(a.base)["loops"] == []
