"""Rebalance planning: even replica counts, never two replicas on one server or node."""

from __future__ import annotations

from cargohold.core.models import (
    Attachment,
    DataServer,
    Replica,
    Volume,
    VolumeState,
)
from cargohold.services.controller.rebalance import Move, plan


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


def _redundancy_kept(volumes: list[Volume], moves: list[Move],
                     servers: list[DataServer]) -> None:
    """Each move adds a copy where the volume has none (nor on that node), never removes."""
    node = {s.id: s.node for s in servers}
    for move in moves:
        [volume] = [v for v in volumes if v.name == move.volume]
        holders = {r.server for r in volume.replicas}
        assert move.source in holders and move.target not in holders
        assert node[move.target] not in {node[h] for h in holders - {move.source}}


def test_a_stuck_most_loaded_server_lets_the_next_one_move() -> None:
    """Node b got a new disk (s2). The most loaded server, s5 on node c, cannot give it a
    replica: each of its volumes has its other copy on s3, node b. The old plan stopped
    there; s3 can move one to s2 (its own node, another disk) without two copies on a node.
    """
    servers = _servers("a", "b", "b", "c", "c")  # s1 a; s2, s3 b; s4, s5 c
    volumes = [_volume("v0", "s1"), _volume("v1", "s4"), _volume("v2", "s3", "s5"),
               _volume("v3", "s3", "s5")]
    moves = plan(servers, volumes)
    assert moves == [Move("v2", "s3", "s2")]
    _redundancy_kept(volumes, moves, servers)


def test_a_target_over_its_provisioning_limit_gets_the_next_candidate() -> None:
    """s3 is empty but has room for small volumes only: s1's big ones cannot go there (the
    old plan gave up), s2's small one can; no move may pass the limit."""
    servers = _servers("a", "a", "a")
    for server in servers:
        server.capacity, server.free = 100 << 30, 50 << 30
    servers[2].max_provisioned = 4 << 30
    big = [_volume(f"big{i}", "s1") for i in range(4)]
    for volume in big:
        volume.size = 10 << 30
    small = [_volume(f"small{i}", "s2") for i in range(3)]
    volumes = big + small
    moves = plan(servers, volumes)
    assert moves[0] == Move("small0", "s2", "s3")
    size = {v.name: v.size for v in volumes}
    assert sum(size[m.volume] for m in moves if m.target == "s3") <= 4 << 30
    _redundancy_kept(volumes, moves, servers)
    servers[2].free = 0  # a full target takes nothing
    assert all(m.target != "s3" for m in plan(servers, volumes))
    servers[2].free, servers[2].max_provisioned = 50 << 30, 0  # no limit: the big ones go
    moves = plan(servers, volumes)
    assert moves[0] == Move("big0", "s1", "s3")
    _redundancy_kept(volumes, moves, servers)
