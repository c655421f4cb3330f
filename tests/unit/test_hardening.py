"""Bad input gets a clear 4xx-class error and changes nothing; a create whose node died half
way is rolled back. (Creates interrupted on a live node: tests/integration/test_create.py.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cargohold.adapters.dockerplugin import DockerPlugin
from cargohold.adapters.dockerplugin import create_app as create_plugin_app
from cargohold.adapters.rest import Services, create_app
from cargohold.core.models import Replica, Volume
from cargohold.core.names import check_name
from cargohold.core.sizes import parse_size, volume_size
from cargohold.errors import InvalidName, InvalidSize
from cargohold.services.agent import Agent
from cargohold.services.controller.controller import Controller
from cargohold.services.controller.scrub import Scrub
from cargohold.services.events import EventFeed
from cargohold.services.nodes import NodeRemoval
from cargohold.services.volumes import VolumeService
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("name", ["vol\n", "vol\nx", "\nvol", "vol ", "vol\x00"])
def test_names_are_matched_in_full(name: str) -> None:
    with pytest.raises(InvalidName):
        check_name(name)


@pytest.mark.parametrize("size", ["9" * 400, "1" + "0" * 400 + "G", 10**400, -(10**30)],
                         ids=["400 digits", "401 digits G", "int of 401 digits", "negative"])
def test_a_size_of_hundreds_of_digits_is_invalid_not_a_crash(size: str | int) -> None:
    with pytest.raises(InvalidSize):
        volume_size(size)


def test_sizes_stay_exact() -> None:
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("0.5K") == 512
    with pytest.raises(InvalidSize):
        parse_size("0.1K")  # 102.4 bytes


def _services(tmp_path: Path) -> Services:
    store = MemoryStore()
    catalog = Catalog(store)
    volumes = VolumeService(catalog)
    agent = Agent(catalog, "n1", tmp_path, "memory://")
    return Services(catalog, volumes, agent, Controller(store, catalog, volumes, "n1"),
                    Scrub(catalog), EventFeed(store), NodeRemoval(catalog), "n1", 10.0)


async def _post(app: Any, path: str, body: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        return await client.post(path, json=body)


@pytest.mark.parametrize("size", ["9" * 400, 10**400, "1e400", "-5G", None],
                         ids=["400 digits", "int of 401 digits", "1e400", "-5G", "null"])
def test_rest_answers_a_bad_size_with_400_and_creates_nothing(tmp_path: Path,
                                                              size: Any) -> None:
    async def body() -> tuple[httpx.Response, list[Volume]]:
        services = _services(tmp_path)
        answer = await _post(create_app(services), "/v1/volumes", {"name": "v", "size": size})
        return answer, await services.catalog.volumes()

    answer, volumes = asyncio.run(body())
    assert 400 <= answer.status_code < 500, answer.text
    assert volumes == []


@pytest.mark.parametrize("opts", [["size=1G"], "size=1G", 5, {"size": 5}, {"size": ["1G"]}])
def test_the_docker_plugin_refuses_options_that_are_not_key_value_strings(
        tmp_path: Path, opts: Any) -> None:
    async def body() -> tuple[dict[str, Any], list[Volume]]:
        services = _services(tmp_path)
        plugin = DockerPlugin(services.catalog, services.volumes, services.agent,
                              tmp_path / "refs.json")
        answer = await _post(create_plugin_app(plugin), "/VolumeDriver.Create",
                             {"Name": "v", "Opts": opts})
        assert answer.status_code == 200
        return answer.json(), await services.catalog.volumes()

    answer, volumes = asyncio.run(body())
    assert "Opts" in answer["Err"] and "[invalid_argument]" in answer["Err"]
    assert volumes == []


def test_the_controller_rolls_back_a_create_whose_node_died_half_way() -> None:
    async def body() -> tuple[list[str], list[Volume], list[tuple[str, str]]]:
        store = MemoryStore()
        catalog = Catalog(store)
        stale = Volume(id="ab" * 16, name="stale", size=64 << 20, replica_count=2, fs="ext4",
                       replicas=[Replica(server="gone1"), Replica(server="gone2")],
                       created=time.time() - 3600)
        fresh = Volume(id="cd" * 16, name="fresh", size=64 << 20, replica_count=1,
                       fs="ext4", replicas=[Replica(server="gone1")])
        await catalog.add_volume(stale)
        await catalog.add_volume(fresh)  # being created right now: left alone
        rolled_back = await VolumeService(catalog).collect_abandoned()
        return rolled_back, await catalog.volumes(), await catalog.garbage()

    rolled_back, volumes, garbage = asyncio.run(body())
    assert rolled_back == ["stale"]
    assert [v.name for v in volumes] == ["fresh"]
    assert sorted(garbage) == [("gone1", "ab" * 16), ("gone2", "ab" * 16)]
