"""Controller failover with three real node processes sharing one metadata store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Node, credentials

LEASE_TTL = 2.0


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[list[Node]]:
    meta = f"sqlite://{tmp_path / 'meta.db'}"
    nodes: list[Node] = []
    try:
        for name in ("n1", "n2", "n3"):
            (tmp_path / name).mkdir()
            node = Node(tmp_path / name, data_servers=1, name=name,
                        extra=("--metadata", meta, "--lease-ttl", str(LEASE_TTL),
                               *credentials(tmp_path, name)))
            nodes.append(node)
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


def _view(node: Node) -> dict[str, dict[str, Any]]:
    listing: list[dict[str, Any]] = node.json("node", "ls")  # type: ignore[assignment]
    return {n["name"]: n for n in listing}


def _leader(node: Node, timeout: float = 15.0, not_: str = "") -> tuple[str, float]:
    """The node every listing names as controller (waits for one); and how long it took."""
    start = time.monotonic()
    while True:
        leaders = [n for n, v in _view(node).items() if v["controller"]]
        if len(leaders) == 1 and leaders[0] != not_:
            return leaders[0], time.monotonic() - start
        assert len(leaders) <= 1, f"two controllers: {leaders}"
        assert time.monotonic() - start < timeout, "no controller elected"
        time.sleep(0.1)


def test_one_controller_and_failover_within_the_lease_time(three_nodes: list[Node]) -> None:
    by_name = {n.name: n for n in three_nodes}
    first, _ = _leader(three_nodes[0])
    for node in three_nodes:  # every node sees the same single controller
        assert _leader(node)[0] == first
    text = by_name[first].cli("node", "ls").stdout
    assert any(line.startswith(first) and "controller" in line for line in text.splitlines())

    by_name[first].kill()  # the controller's node dies without a word
    survivor = next(n for n in three_nodes if n.name != first)
    second, took = _leader(survivor, not_=first)
    print(f"controller moved {first} -> {second} in {took:.1f} s (lease {LEASE_TTL} s)")
    assert took <= LEASE_TTL + 3.0  # lease expiry + one check period, with slack

    def dead_servers_down() -> bool:
        view = _view(survivor)[first]
        return view["lease"] == "expired" and all(
            s["state"] == "down" for s in view["data_servers"])

    deadline = time.monotonic() + 10
    while not dead_servers_down():  # the new controller marks the dead node's servers
        assert time.monotonic() < deadline, _view(survivor)[first]
        time.sleep(0.1)

    # operations keep working: placement uses the two live nodes only
    survivor.cli("volume", "create", "after", "--size", "64M", "--replicas", "2")
    nodes_used = {r["node"] for r in survivor.json("volume", "inspect", "after")["replicas"]}
    assert first not in nodes_used and len(nodes_used) == 2
    refused = survivor.cli("volume", "create", "three", "--size", "64M", "--replicas", "3",
                           check=False)
    assert refused.returncode == 4 and "Cannot place 3 replicas" in refused.stderr

    by_name[first].start()  # it comes back: its servers are up again, the controller stays
    deadline = time.monotonic() + 10
    while any(s["state"] != "up" for s in _view(survivor)[first]["data_servers"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _leader(survivor)[0] == second
    survivor.cli("volume", "rm", "after")


def test_a_stopping_controller_hands_over_at_once(three_nodes: list[Node]) -> None:
    first, _ = _leader(three_nodes[0])
    leaving = next(n for n in three_nodes if n.name == first)
    leaving.stop()  # SIGTERM: the node revokes its lease, so nobody waits for it to expire
    survivor = next(n for n in three_nodes if n.name != first)
    second, took = _leader(survivor, not_=first)
    assert second != first and took < LEASE_TTL
