"""Sizes, names, chunk math and placement: pure code, no I/O."""

from __future__ import annotations

import pytest

from cargohold.core import layout, placement
from cargohold.core.models import DataServer, ServerState
from cargohold.core.names import check_name
from cargohold.core.sizes import GIB, MIB, TIB, format_size, parse_size, volume_size
from cargohold.errors import InvalidName, InvalidSize, Kind, NotEnoughDataServers, OverProvisioned


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 * MIB), ("2G", 2 * GIB), ("1T", TIB), ("1073741824", GIB),
    ("1.5G", 3 * GIB // 2), ("2GiB", 2 * GIB), ("64m", 64 * MIB), (4096, 4096),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-1G", "abc", "1E", "", "1.2.3G", "0.1B", "12Q"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(InvalidSize) as info:
        volume_size(text)
    assert repr(text) in info.value.message


def test_volume_size_rounds_up_to_mib_and_checks_limits() -> None:
    assert volume_size(20 * MIB + 1) == 21 * MIB
    with pytest.raises(InvalidSize, match="smallest"):
        volume_size("1M")
    with pytest.raises(InvalidSize, match="largest"):
        volume_size("65T")


def test_format_size() -> None:
    assert format_size(2 * GIB) == "2G"
    assert format_size(1536 * MIB) == "1.5G"
    assert format_size(100) == "100B"


@pytest.mark.parametrize("name", ["pgdata", "a", "web-1.data_x", "A" * 63])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "has space", "A" * 64, "-lead", ".hidden", "a/b",
                                  "ü", None])
def test_bad_names(name: object) -> None:
    with pytest.raises(InvalidName):
        check_name(name)


def test_split_at_chunk_boundaries() -> None:
    cs = layout.CHUNK_SIZE
    extents = list(layout.split(cs - 4096, 8192))
    assert extents == [layout.Extent(0, cs - 4096, 4096, 0), layout.Extent(1, cs, 4096, 4096)]
    assert sum(e.length for e in layout.split(123, 5 * cs)) == 5 * cs
    assert list(layout.chunks(cs - 1, 2)) == [0, 1]
    assert list(layout.blocks(8192, 8192)) == [2, 3]
    assert layout.chunk_count(cs + 1) == 2
    assert layout.is_aligned(4096, 8192) and not layout.is_aligned(512, 4096)


def _server(i: int, node: str, free: int, state: ServerState = ServerState.UP) -> DataServer:
    return DataServer(id=f"s{i}", node=node, address=f"127.0.0.1:{1000 + i}", path=f"/d{i}",
                      capacity=100 * GIB, free=free, state=state)


def test_single_node_places_on_distinct_servers_most_free_first() -> None:
    servers = [_server(1, "a", 10 * GIB), _server(2, "a", 50 * GIB), _server(3, "a", 30 * GIB)]
    assert [s.id for s in placement.place(servers, 2, GIB)] == ["s2", "s3"]


def test_several_nodes_place_on_distinct_nodes() -> None:
    servers = [_server(1, "a", 90 * GIB), _server(2, "a", 80 * GIB), _server(3, "b", 10 * GIB)]
    chosen = placement.place(servers, 2, GIB)
    assert {s.node for s in chosen} == {"a", "b"}
    with pytest.raises(NotEnoughDataServers, match="distinct nodes"):
        placement.place(servers, 3, GIB)


def test_placement_skips_servers_down_to_their_space_reserve() -> None:
    servers = [_server(1, "a", 2 * GIB), _server(2, "a", GIB), _server(3, "a", 3 * GIB)]
    servers[0].reserve = 4 * GIB  # its new chunks are refused: no new replica there
    assert [s.id for s in placement.place(servers, 2, GIB)] == ["s3", "s2"]
    with pytest.raises(NotEnoughDataServers):
        placement.place(servers, 3, GIB)


def test_placement_skips_down_and_excluded_servers() -> None:
    servers = [_server(1, "a", GIB, ServerState.DOWN), _server(2, "a", GIB), _server(3, "a", GIB)]
    with pytest.raises(NotEnoughDataServers) as info:
        placement.place(servers, 3, GIB)
    assert "only 2 usable" in info.value.message
    assert [s.id for s in placement.place(servers, 1, GIB, exclude=["s2"])] == ["s3"]


def test_over_provisioning_limit_is_respected_and_named() -> None:
    servers = [_server(1, "a", 90 * GIB), _server(2, "a", 80 * GIB)]
    servers[0].provisioned, servers[0].max_provisioned = 150 * GIB, 200 * GIB
    servers[1].provisioned, servers[1].max_provisioned = 10 * GIB, 200 * GIB
    assert [s.id for s in placement.place(servers, 2, 50 * GIB)] == ["s2", "s1"]
    with pytest.raises(OverProvisioned, match=r"s1: 150G of 200G provisioned") as caught:
        placement.place(servers, 2, 51 * GIB)
    assert caught.value.kind is Kind.NO_SPACE
    assert [s.id for s in placement.place(servers, 1, 51 * GIB)] == ["s2"]
    servers[0].max_provisioned = servers[1].max_provisioned = 0  # no limit
    assert len(placement.place(servers, 2, 500 * GIB)) == 2
    with pytest.raises(NotEnoughDataServers):  # too few servers at all: not a space problem
        placement.place(servers, 3, GIB)
