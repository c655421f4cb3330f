"""Metrics as operators meet them: Debian's Prometheus scrapes a real node over HTTPS with a
read-only token, sees a volume's writes and its degradation when a data server dies, loads
the alert rules, and accepts every query of the Grafana board; ``promtool`` accepts the
exposition; ``df`` does not list the engines' FUSE files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Node, free_port, needs_root, stop_process, tcp_node

pytestmark = [needs_root(), pytest.mark.system,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="needs Debian's prometheus")]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
READER = "prometheus-reader-0123456789"


class Prometheus:
    """A Prometheus server of its own, scraping one target every second."""

    def __init__(self, base: Path, target: str, ca: Path, token_file: Path,
                 context: Callable[[], str] = str) -> None:
        """``context``: what to show beside Prometheus' log when a wait fails."""
        self.base = base
        self.context = context
        self.port = free_port()
        base.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEPLOY / "prometheus" / "alerts.yml", base / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(base / "alerts.yml")],
            "scrape_configs": [{
                "job_name": "cargohold", "scheme": "https", "static_configs": [
                    {"targets": [target]}],
                "tls_config": {"ca_file": str(ca)},
                "authorization": {"credentials_file": str(token_file)}}]}
        (base / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = base / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={base / 'prometheus.yml'}",
                 f"--storage.tsdb.path={base / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_for(lambda: httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200,
                      "ready", 60)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = answer.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = check()
            except httpx.TransportError:
                found = None
            if found:
                return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: no {what} in {timeout} s\n"
                                     f"{self.log.read_text()[-3000:]}\n{self.context()}")
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Node, Prometheus, int]]:
    """A node with two data servers and a TCP API, and a Prometheus scraping it."""
    # resyncs at 256 KiB/s: a replica that missed 4 MiB stays out of sync for seconds,
    # whereas the node restarts a killed data server within one
    node, port = tcp_node(tmp_path, f"ops admin admin-secret-0123456789\n"
                          f"prometheus read-only {READER}\n", "--rebuild-rate", "256K")
    prometheus = None
    try:
        node.start()
        reader = tmp_path / "reader-token"
        reader.write_text(READER + "\n")
        prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{port}",
                                node.state / "tls" / "ca.crt", reader, node.logs)
        yield node, prometheus, port
    finally:
        if prometheus is not None:
            prometheus.stop()
        node.cleanup()


def _node_exporter_sizes() -> dict[str, float] | None:
    """node_filesystem_size_bytes by mount point, from Debian's node_exporter (None when it
    is not installed)."""
    binary = shutil.which("prometheus-node-exporter")
    if binary is None:
        return None
    port = free_port()
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}",
                             "--collector.disable-defaults", "--collector.filesystem"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["mountpoint"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "node_filesystem_size_bytes"}


def _dashboard_queries() -> list[str]:
    board = json.loads((DEPLOY / "grafana" / "cargohold.json").read_text())
    found = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(found) >= 15
    return [q.replace("$volume", ".*") for q in found]


def test_prometheus_sees_writes_and_a_degraded_volume(watched: tuple[Node, Prometheus, int]
                                                      ) -> None:
    node, prometheus, port = watched
    node.cli("volume", "create", "pg", "--size", "256M", "--replicas", "2")
    mountpoint = Path(node.cli("volume", "attach", "pg").stdout.strip())
    with open(mountpoint / "f", "wb") as f:  # a few seconds of writes, each one synced
        for _ in range(300):
            f.write(os.urandom(64 << 10))
            f.flush()
            os.fsync(f.fileno())
    prometheus.wait_for(lambda: prometheus.query(
        'rate(cargohold_volume_io_operations_total{volume="pg",op="write"}[10s]) > 0'),
        "write rate of pg")
    [used] = prometheus.wait_for(lambda: prometheus.query(
        'cargohold_volume_used_bytes{volume="pg"} > 16 * 1024 * 1024'), "use of pg", 60)
    assert float(used["value"][1]) <= 256 << 20
    [healthy] = prometheus.query('cargohold_volume_robustness{volume="pg"} == 1')
    assert healthy["metric"]["robustness"] == "healthy"

    # the exposition passes promtool's lint, read with the read-only token as Prometheus does
    ca = ssl.create_default_context(cafile=str(node.state / "tls" / "ca.crt"))
    text = httpx.get(f"https://127.0.0.1:{port}/metrics", verify=ca, timeout=10,
                     headers={"authorization": f"Bearer {READER}"}).text
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert httpx.get(f"https://127.0.0.1:{port}/metrics", verify=ca,
                     timeout=10).status_code == 401  # no token: nothing

    # the rules load in the real server, and every query of the board is valid there
    rules = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
    loaded = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
    assert {"CargoholdVolumeDegraded", "CargoholdDataServerDown",
            "CargoholdControllerMissing"} <= loaded
    for expr in _dashboard_queries():
        prometheus.query(expr)  # asserts status "success"
    assert prometheus.query('sum(cargohold_volume_size_bytes{volume=~".*"})')

    # the engines' FUSE files are not in df's list; the volume's own file system is
    listed = subprocess.run(["df", "--output=source,target"], capture_output=True,
                            text=True).stdout
    assert str(mountpoint) in listed and "/fuse" not in listed
    # node_exporter lists the FUSE file with size 0 (avail/size is NaN: no "full" alert)
    sizes = _node_exporter_sizes()
    if sizes is not None:
        fuse = str(node.state / "engines" / "pg" / "fuse")
        assert sizes[fuse] == 0.0 and sizes[str(mountpoint)] > 200 << 20

    # a data server dies (both hold a replica): the volume reads as degraded, at least
    # until the node has started the data server again and the replica caught up
    os.kill(node.dataserver_pids()[0], signal.SIGKILL)
    with open(mountpoint / "g", "wb") as f:  # a write finds the replica gone
        f.write(os.urandom(4 << 20))
        f.flush()
        os.fsync(f.fileno())
    prometheus.wait_for(lambda: prometheus.query(
        'max_over_time(cargohold_volume_robustness{volume="pg",robustness="degraded"}[5m])'
        ' == 1'), "degraded pg", 60)
    node.cli("volume", "detach", "pg")
