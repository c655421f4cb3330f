"""The cluster CA as an operator meets it: `cargohold pki`, a node's first start, a node that
brings credentials of another cluster or of another node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cargohold.core import wire
from cargohold.stores import pki
from tests.conftest import Node, _env, credentials, plain_hello


def cargohold(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cargohold.cli", *args], capture_output=True,
                          text=True, env=_env(), timeout=120)


def test_pki_init_and_issue_write_secrets_for_root_only_and_never_overwrite(
        tmp_path: Path) -> None:
    ca, out = tmp_path / "ca", tmp_path / "n1"
    done = cargohold("pki", "init", "--dir", str(ca))
    assert done.returncode == 0, done.stderr
    assert "pki issue" in done.stdout
    done = cargohold("pki", "issue", "n1", "--dir", str(ca), "--out", str(out))
    assert done.returncode == 0, done.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*ca.iterdir(), *out.iterdir()]}
    assert modes["ca.key"] == modes["cluster.key"] == modes["node.key"] == 0o600
    assert (ca.stat().st_mode & 0o777) == (out.stat().st_mode & 0o777) == 0o700
    creds = pki.Credentials.from_dir(out)
    assert creds.name == "n1"
    before = {p.name: p.read_bytes() for p in [*ca.iterdir(), *out.iterdir()]}
    again = cargohold("pki", "init", "--dir", str(ca))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    again = cargohold("pki", "issue", "n2", "--dir", str(ca), "--out", str(out))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    bad = cargohold("pki", "issue", "a b", "--dir", str(ca), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and not (tmp_path / "x").exists()
    assert {p.name: p.read_bytes() for p in [*ca.iterdir(), *out.iterdir()]} == before


def test_a_node_alone_makes_its_cluster_ca_and_serves_data_over_tls_only(
        tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=1)
    try:
        node.start()
        assert (node.state / "pki" / "ca.key").exists()
        assert pki.Credentials.from_dir(node.state / "tls").name == node.name
        assert "pki issue NAME" in node.log.read_text()
        ready = json.loads((node.data_dirs[0] / "process.json").read_text())
        assert ready["tls"] and ready["guarded"]
        assert wire.MAGIC not in plain_hello(ready["address"])
        node.cli("volume", "create", "v", "--size", "64M", "--replicas", "1")
        node.stop()
        node.start()  # the same credentials again, adopted data servers included
        assert node.json("volume", "inspect", "v")["name"] == "v"  # type: ignore[index]
    finally:
        node.cleanup()


def test_a_node_of_another_ca_cannot_join(tmp_path: Path) -> None:
    meta = f"sqlite://{tmp_path / 'meta.db'}"
    first = Node(tmp_path / "n1", data_servers=1, name="n1",
                 extra=("--metadata", meta, *credentials(tmp_path, "n1")))
    stranger = Node(tmp_path / "n2", data_servers=1, name="n2", extra=("--metadata", meta))
    try:
        (tmp_path / "n1").mkdir()
        (tmp_path / "n2").mkdir()
        first.start()
        try:
            stranger.start(timeout=30)
            raise AssertionError("a node with its own CA joined the cluster")
        except RuntimeError as e:
            assert "Issue this node's credentials from the cluster's CA" in str(e)
        # no data server of it was left running
        assert stranger.dataserver_pids() == []
    finally:
        stranger.cleanup()
        first.cleanup()


def test_a_node_refuses_credentials_issued_to_another_node(tmp_path: Path) -> None:
    node = Node(tmp_path, data_servers=1, name="n1", extra=credentials(tmp_path, "n9"))
    try:
        node.start(timeout=30)
        raise AssertionError("the node started with another node's certificate")
    except RuntimeError as e:
        assert "was issued to node 'n9'" in str(e)
    finally:
        node.cleanup()
