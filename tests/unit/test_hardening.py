"""Bad input gets a clear 4xx-class error and changes nothing; a create whose node died half
way is rolled back. (Creates interrupted on a live node: tests/integration/test_create.py.)"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cargohold.adapters.dockerplugin import DockerPlugin
from cargohold.adapters.dockerplugin import create_app as create_plugin_app
from cargohold.adapters.rest import Services, create_app
from cargohold.config import ApiToken, read_tokens_file
from cargohold.core.models import Replica, Volume, VolumeState
from cargohold.core.names import check_name
from cargohold.core.sizes import parse_size, volume_size
from cargohold.errors import InvalidArgument, InvalidName, InvalidSize, MetadataUnavailable
from cargohold.services.agent import Agent
from cargohold.services.clones import CloneService
from cargohold.services.controller.controller import Controller
from cargohold.services.controller.scrub import Scrub
from cargohold.services.events import EventFeed
from cargohold.services.nodes import NodeRemoval
from cargohold.services.snapshots import SnapshotService
from cargohold.services.volumes import VolumeService
from cargohold.stores.auditlog import AuditLog
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
    snapshots = SnapshotService(catalog)
    return Services(catalog, volumes, agent, Controller(store, catalog, volumes, "n1"),
                    Scrub(catalog), EventFeed(store), NodeRemoval(catalog), "n1", 10.0,
                    snapshots, CloneService(catalog, volumes, snapshots))


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


# --- roles and the audit log --------------------------------------------------------------

ADMIN = "admin-secret-0123456789"
READER = "reader-secret-0123456789"


def _tokens() -> list[ApiToken]:
    return [ApiToken(name="ops", role="admin", token=ADMIN),
            ApiToken(name="grafana", role="read-only", token=READER)]


def test_a_read_only_token_reads_and_changes_nothing_and_every_change_is_audited(
        tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log")

    async def body() -> dict[str, int]:
        services = _services(tmp_path)
        app = create_app(services, _tokens(), audit)
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 4711))
        statuses = {}
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            for who, secret in (("nobody", "wrong-secret-0123456789"), ("grafana", READER),
                                ("ops", ADMIN)):
                headers = {"authorization": f"Bearer {secret}"}
                read = await client.get("/v1/volumes", headers=headers)
                change = await client.post("/v1/volumes", headers=headers,
                                           json={"name": "v", "size": "64M"})
                statuses[f"{who} GET"] = read.status_code
                statuses[f"{who} POST"] = change.status_code
                if who == "grafana":
                    assert change.json()["error"]["code"] == "forbidden"
            assert (await client.get("/healthz")).status_code == 200  # for probes
        assert await services.catalog.volumes() == []  # nothing made by the refused calls
        return statuses

    statuses = asyncio.run(body())
    assert statuses == {"nobody GET": 401, "nobody POST": 401, "grafana GET": 200,
                        "grafana POST": 403, "ops GET": 200,
                        "ops POST": 409}  # no data servers here: refused by placement
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(r["who"], r["method"], r["path"], r["status"]) for r in lines] == [
        ("unknown", "POST", "/v1/volumes", 401), ("grafana", "POST", "/v1/volumes", 403),
        ("ops", "POST", "/v1/volumes", 409)]
    assert {r["peer"] for r in lines} == {"10.0.0.9:4711"}
    assert (tmp_path / "audit.log").stat().st_mode & 0o077 == 0


def test_the_tokens_file_is_checked_line_by_line(tmp_path: Path) -> None:
    good = tmp_path / "tokens"
    good.write_text(f"# name role token\nops admin {ADMIN}\ngrafana read-only {READER}  # ro\n")
    good.chmod(0o600)
    assert [(t.name, t.role) for t in read_tokens_file(good)] == [("ops", "admin"),
                                                                  ("grafana", "read-only")]
    good.chmod(0o644)
    with pytest.raises(InvalidArgument, match="readable by others"):
        read_tokens_file(good)
    for text, problem in ((f"ops root {ADMIN}\n", "line 1"), ("ops admin short\n", "line 1"),
                          (f"ops admin {ADMIN}\nops read-only {READER}\n", "used twice"),
                          (f"\nops admin {ADMIN} extra\n", "line 2")):
        bad = tmp_path / "bad"
        bad.write_text(text)
        bad.chmod(0o600)
        with pytest.raises(InvalidArgument, match=problem):
            read_tokens_file(bad)


class _LostAnswers(MemoryStore):
    """A store whose transactions lose their answer (as etcd's during an election): the
    first ``lose`` are applied, then reported unavailable; ``refuse`` more are not applied."""

    def __init__(self, lose: int, refuse: int = 0) -> None:
        super().__init__()
        self.lose, self.refuse = lose, refuse

    async def txn(self, *args: Any, **kwargs: Any) -> Any:
        if self.refuse:
            self.refuse -= 1
            raise MetadataUnavailable(url="test://", detail="no answer")
        result = await super().txn(*args, **kwargs)
        if self.lose:
            self.lose -= 1
            raise MetadataUnavailable(url="test://", detail="no answer")
        return result


def test_a_volume_update_whose_answer_was_lost_reads_back_whether_it_landed() -> None:
    def detached(v: Volume) -> Volume:
        v.state = VolumeState.DETACHED
        return v

    async def body() -> None:
        store = _LostAnswers(lose=0)
        catalog = Catalog(store)
        await catalog.add_volume(Volume(id="ab" * 16, name="v", size=64 << 20,
                                        replica_count=1, fs="ext4"))
        store.lose = 1  # applied, answer lost: the update succeeded
        assert (await catalog.update_volume("v", detached)).state is VolumeState.DETACHED
        assert (await catalog.volume("v")).state is VolumeState.DETACHED
        store.refuse = 1  # not applied: the caller hears the store was unavailable

        def creating(v: Volume) -> Volume:
            v.state = VolumeState.CREATING
            return v

        with pytest.raises(MetadataUnavailable):
            await catalog.update_volume("v", creating)
        assert (await catalog.volume("v")).state is VolumeState.DETACHED

    asyncio.run(body())
