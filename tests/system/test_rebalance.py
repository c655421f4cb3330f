"""A data server joins: rebalance spreads replicas onto it, data intact (real node)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Node, _env, needs_root

pytestmark = [needs_root(), pytest.mark.system]

MIB = 1 << 20


def _loads(node: Node) -> Counter[str]:
    counts: Counter[str] = Counter()
    for volume in node.json("volume", "ls"):  # type: ignore[union-attr]
        for replica in node.json("volume", "inspect", volume["name"])["replicas"]:
            counts[replica["path"]] += 1
    return counts


def test_rebalance_spreads_replicas_onto_a_new_data_server(tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=2)
    try:
        node.start()
        for name in ("v1", "v2", "v3"):
            node.cli("volume", "create", name, "--size", "64M", "--replicas", "2")
        mountpoint = Path(node.cli("volume", "attach", "v1").stdout.strip())
        data = os.urandom(8 * MIB)
        (mountpoint / "f").write_bytes(data)
        node.cli("volume", "detach", "v1")
        assert node.cli("rebalance").stdout.strip() == "balanced: nothing to move"

        node.stop()  # the host gets a new disk
        node.data_dirs.append(tmp_path / "disk3")
        node.start()
        plan: dict[str, Any] = node.json("rebalance", "--dry-run")  # type: ignore[assignment]
        assert len(plan["moves"]) == 2 and {m["volume"] for m in plan["moves"]} <= {"v1", "v2",
                                                                                   "v3"}
        assert sorted(_loads(node).values()) == [3, 3]  # nothing moved by a dry run
        done = node.cli("rebalance", "--wait")
        assert "2 replicas moving" in done.stdout and "done" in done.stderr
        assert sorted(_loads(node).values()) == [2, 2, 2]
        for name in ("v1", "v2", "v3"):
            states = {r["state"] for r in node.json("volume", "inspect", name)["replicas"]}
            assert states == {"in_sync"}
        mountpoint = Path(node.cli("volume", "attach", "v1").stdout.strip())
        assert hashlib.sha256((mountpoint / "f").read_bytes()).digest() == \
            hashlib.sha256(data).digest()
        node.cli("volume", "detach", "v1")
        assert node.cli("rebalance").stdout.strip() == "balanced: nothing to move"
    finally:
        node.cleanup()


def test_event_stream_follows_a_volume_through_its_life(tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=2)
    follower = None
    try:
        node.start()
        follower = subprocess.Popen(
            [sys.executable, "-m", "cargohold.cli", "--host", node.host, "events", "-o", "json"],
            stdout=subprocess.PIPE, text=True, env=_env())
        assert follower.stdout is not None
        assert json.loads(follower.stdout.readline())["event"] == "started"
        node.cli("volume", "create", "ev", "--size", "64M", "--replicas", "2")
        node.cli("volume", "attach", "ev")
        node.cli("volume", "detach", "ev")
        node.cli("volume", "rm", "ev")
        seen = []
        while ("volume", "removed") not in seen:
            event = json.loads(follower.stdout.readline())
            if event["name"] == "ev":
                seen.append((event["kind"], event["event"]))
        assert seen == [("volume", "created"), ("volume", "detached"),
                        ("volume", "attaching"), ("volume", "attached"),
                        ("volume", "detaching"), ("volume", "detached"),
                        ("volume", "deleting"), ("volume", "removed")]
    finally:
        if follower is not None:
            follower.kill()
            follower.wait()
            if follower.stdout is not None:
                follower.stdout.close()
        node.cleanup()
