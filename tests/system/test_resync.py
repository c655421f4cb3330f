"""Resync after a transient data server outage: only the chunks it missed are copied."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from pathlib import Path

import pytest

from cargohold.stores.chunkstore import DiskChunkStore
from tests.conftest import Node, needs_root

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20


def _write(path: Path, size: int) -> str:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _states(node: Node, name: str) -> dict[str, str]:
    return {r["path"]: r["state"] for r in node.json("volume", "inspect", name)["replicas"]}


def test_a_returning_data_server_gets_only_what_it_missed(tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=2)
    try:
        node.start()
        node.cli("volume", "create", "rs", "--size", "256M", "--replicas", "2")
        mountpoint = Path(node.cli("volume", "attach", "rs").stdout.strip())
        before = _write(mountpoint / "before.bin", 64 * MIB)
        volume = node.json("volume", "inspect", "rs")
        victim = volume["replicas"][1]["path"]
        os.kill(json.loads((Path(victim) / "process.json").read_text())["pid"], signal.SIGKILL)
        after = _write(mountpoint / "after.bin", 8 * MIB)  # the victim misses these writes
        assert _states(node, "rs")[victim] == "out_of_sync"

        node.cli("volume", "detach", "rs")  # the node has restarted the victim meanwhile
        done = node.cli("volume", "rebuild", "rs", "--wait")  # the controller resyncs
        assert "done" in done.stderr and "in sync" in done.stdout
        assert set(_states(node, "rs").values()) == {"in_sync"}
        [done] = re.findall(r"resync of rs done: (\d+) of (\d+) chunks copied", node.logs())
        copied, total = int(done[0]), int(done[1])
        print(f"resync copied {copied} of {total} chunks (8 MiB written while away)")
        assert 8 <= copied < 32, "only the chunks written while it was away are copied"
        inspected = node.json("volume", "inspect", "rs")
        assert inspected["in_sync"] == 2

        node.stop()  # compare the two copies on disk, chunk by chunk
        stores = [DiskChunkStore(Path(r["path"])) for r in inspected["replicas"]]
        try:
            first, second = (s.replica(inspected["id"]) for s in stores)
            assert first.generations() == second.generations()
            for offset in range(0, inspected["size"], 16 * MIB):
                assert first.read(offset, 16 * MIB) == second.read(offset, 16 * MIB), offset
        finally:
            for store in stores:
                store.close()

        node.start()
        mountpoint = Path(node.cli("volume", "attach", "rs").stdout.strip())
        for name, digest in (("before.bin", before), ("after.bin", after)):
            assert hashlib.sha256((mountpoint / name).read_bytes()).hexdigest() == digest
        node.cli("volume", "detach", "rs")
        node.cli("volume", "rm", "rs")
    finally:
        node.cleanup()
