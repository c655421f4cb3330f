"""A running Docker container moved with its volume to a host of another cluster
(tests/hosts.py: four network-namespace hosts, two cargohold clusters of two, each with its
own etcd, CA and dockerd per host): every write the application got acknowledged is there,
it goes on where it stopped, and the source is fenced."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.hosts import IMAGE, REMOTE_TOKEN, Host, Hosts, hosts_for, wait_for

pytestmark = [pytest.mark.system]

#: Appends the next number to /data/log and syncs it (acknowledged), 20 times a second;
#: started again, it goes on from the last number in the file.
APP = ("i=$(wc -l < /data/log 2>/dev/null || echo 0); "
       "while true; do echo $i >> /data/log; sync /data/log; i=$((i+1)); sleep 0.05; done")


@pytest.fixture
def clusters(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    yield from hosts_for(request, docker=True, n=4, clusters=2)


def _lines(host: Host, container: str) -> list[int]:
    done = host.docker("exec", container, "cat", "/data/log", timeout=30)
    return [int(line) for line in done.stdout.split()]


def test_a_container_moves_with_its_volume_to_the_other_cluster(clusters: Hosts) -> None:
    h1, _h2, h3, _h4 = clusters
    token = h1.base / "dr-token"
    token.write_text(REMOTE_TOKEN + "\n")
    token.chmod(0o600)
    h1.cli("remote", "add", "dr", "--endpoint", h3.api_url, "--token-file", str(token),
           "--ca", str(h3.ca))
    h1.docker("volume", "create", "-d", "cargohold", "--name", "appdata", "-o", "size=256M")
    h1.docker("run", "-d", "--name", "app", "-v", "appdata:/data", "-e", "ROLE=primary",
              IMAGE, "sh", "-c", APP)
    wait_for(lambda: len(_lines(h1, "app")) > 40, 60, "the app to write 40 lines")
    here = ("--docker", f"unix://{h1.docker_socket}")
    refused = h1.cli("container", "migrate", "app", *here, "--to", "dr", "--target-docker",
                     "unix:///nonexistent.sock", check=False)
    assert refused.returncode == 5 and "docker_unavailable" in refused.stderr, refused.stderr
    assert h1.docker("inspect", "-f", "{{.State.Status}}", "app").stdout.strip() == "running"
    assert h1.json("volume", "inspect", "appdata")["migration"] is None

    done = h1.cli("container", "migrate", "app", *here, "--to", "dr", "--target-docker",
                  f"unix://{h3.docker_socket}", "-o", "json", timeout=600)
    moved = json.loads(done.stdout)
    print(f"\ncontainer moved: down {moved['downtime']:.2f} s (handover "
          f"{moved['handover']:.2f} s), writes held "
          f"{moved['held'] * 1000:.0f} ms, rounds "
          f"{[r['bytes'] for r in moved['volumes']['appdata']['rounds']]}")
    assert moved["volumes"]["appdata"]["state"] == "done"
    assert 0 < moved["held"] <= moved["downtime"] < 60

    # the source: no container, the volume fenced
    assert h1.docker("ps", "-aq", "--filter", "name=app").stdout.strip() == ""
    assert "migrated to dr" in h1.json("volume", "inspect", "appdata")["fenced_by"]
    # the target: the same container, running on the promoted volume, going on
    env = h3.docker("inspect", "-f", "{{json .Config.Env}}", "app").stdout
    assert "ROLE=primary" in env
    first = _lines(h3, "app")
    wait_for(lambda: len(_lines(h3, "app")) > len(first) + 10, 60, "the app to go on there")
    lines = _lines(h3, "app")
    assert lines == list(range(len(lines))), "a line lost or repeated across the move"
    volume = h3.json("volume", "inspect", "appdata")
    assert volume["promoted_from"]["volume"] == "appdata"
    assert volume["attachment"]["node"] == h3.name
    h3.docker("rm", "-f", "app")
