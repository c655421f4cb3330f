"""Rebalance planning: even replica counts, never two replicas on one server or node."""

from __future__ import annotations

from cargohold.core.models import (
    Attachment,
    DataServer,
    Replica,
    Volume,
    VolumeState,
)
from cargohold.services.rebalance import Move, plan


def _servers(*nodes: str) -> list[DataServer]:
    return [DataServer(id=f"s{i}", node=node, address=f"x:{i}", path=f"/d{i}")
            for i, node in enumerate(nodes, 1)]


def _volume(name: str, *servers: str, attached: bool = False) -> Volume:
    v = Volume(id=name.ljust(32, "0"), name=name, size=1 << 30, replica_count=len(servers),
               fs="ext4", state=VolumeState.DETACHED,
               replicas=[Replica(server=s) for s in servers])
    if attached:
        v.state, v.attachment = VolumeState.ATTACHED, Attachment(node="a", epoch=1)
    return v


def test_a_new_server_gets_replicas_until_counts_are_even() -> None:
    servers = _servers("a", "a", "a")  # one node: distinct servers are enough
    volumes = [_volume(f"v{i}", "s1", "s2") for i in range(3)]
    moves = plan(servers, volumes)
    assert len(moves) == 2 and all(m.target == "s3" for m in moves)
    assert {m.source for m in moves} == {"s1", "s2"}
    assert len({m.volume for m in moves}) == 2  # one move per volume at a time


def test_moves_respect_nodes_attachment_and_moves_in_flight() -> None:
    servers = _servers("a", "b", "c")
    volumes = [_volume("v1", "s1", "s2"), _volume("v2", "s1", "s2", attached=True),
               _volume("v3", "s1", "s2")]
    volumes[2].replicas.append(Replica(server="s3", replaces="s2"))  # already moving
    [move] = plan(servers, volumes)  # v2 is attached, v3 is moving: only v1 can go
    assert move in (Move("v1", "s1", "s3"), Move("v1", "s2", "s3"))
    balanced = [_volume("w1", "s1", "s2"), _volume("w2", "s2", "s3"), _volume("w3", "s3", "s1")]
    assert plan(servers, balanced) == []
    assert plan([], balanced) == []
