"""The REST API under generated requests (schemathesis, from the live OpenAPI document of a
real node on TCP): never a 500, only documented statuses, and a refused change changes
nothing. 503 and 507 are documented answers (a peer is down; the cluster has no room: the
node has one data server, over-provisioned up to twice its disk), not failures."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import Node

TOKEN = "fuzz-token-0123456789abcdef"
EXAMPLES = 60  # per operation
STREAMS = {"/v1/events"}  # endless: not fuzzed here (tests/unit/test_events.py)
#: Calls that reach out to a server named in the request (an S3 endpoint): its checks are
#: tests/unit/test_objectstore.py's, the calls tests/system/test_backups.py's.
#: Adding a remote calls the cluster named (tests/system/test_replication.py's checks).
OUTBOUND = {("PUT", "/v1/backup-target"), ("POST", "/v1/remotes")}

pytestmark = pytest.mark.timeout(600)


def _state(client: httpx.Client) -> Any:
    """What a refused request must leave as it was (the volatile figures aside)."""
    volumes = sorted((v["name"], v["state"], v["size"], v["replica_count"], v["fs"])
                     for v in client.get("/v1/volumes").json())
    nodes = sorted((n["name"], n["draining"]) for n in client.get("/v1/nodes").json())
    return volumes, nodes


def test_generated_requests_get_documented_answers_and_refusals_change_nothing(
        tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = Node(tmp_path, data_servers=1, extra=("--api", f"tcp://127.0.0.1:{port}"),
                env={"CARGOHOLD_TOKEN": TOKEN})
    url = f"https://127.0.0.1:{port}"  # HTTPS with the node's own cluster CA
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        node.start()
        ca = str(node.state / "tls" / "ca.crt")
        trust = ssl.create_default_context(cafile=ca)
        with httpx.Client(verify=trust) as fetch:
            schema = schemathesis.openapi.from_dict(
                fetch.get(f"{url}/openapi.json", headers=headers).json())
        assert schema.raw_schema["components"]["securitySchemes"]["bearer"]["scheme"] == \
            "bearer"
        problems: list[str] = []
        operations = 0
        with httpx.Client(base_url=url, headers=headers, timeout=60, verify=trust) as client:
            for result in schema.get_all_operations():
                operation = result.ok()
                if operation.path in STREAMS or (operation.method.upper(),
                                                 operation.path) in OUTBOUND:
                    continue
                operations += 1
                _fuzz(operation, client, url, headers, ca, problems)
        assert operations >= 15
        assert problems == [], "\n".join(problems)
    finally:
        node.cleanup()


def _fuzz(operation: Any, client: httpx.Client, url: str, headers: dict[str, str], ca: str,
          problems: list[str]) -> None:
    documented = {str(code) for code in operation.definition.raw["responses"]}
    changes = operation.method.upper() not in ("GET", "HEAD")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        before = _state(client) if changes else None
        response = case.call(base_url=url, headers=headers, timeout=60, verify=ca)
        status = response.status_code
        what = f"{operation.label} {case.path_parameters} {case.body!r:.200}"
        refused = 400 <= status < 500 or status in (503, 507)
        if status == 500 or (status > 500 and not refused):
            problems.append(f"{what}: {status} {response.text[:300]}")
        elif str(status) not in documented:
            problems.append(f"{what}: {status} is not documented")
        elif changes and refused and _state(client) != before:
            problems.append(f"{what}: refused with {status} but changed state")

    check()
