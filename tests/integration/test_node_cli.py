"""A real node process on this machine, driven through the CLI as a user would."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import certifi
import httpx
import pytest

from tests.conftest import Node, _env


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("shared"))
    try:
        n.start()
        yield n
    finally:
        n.cleanup()


def test_create_ls_inspect_rm(node: Node) -> None:
    assert node.cli("volume", "create", "pgdata", "--size", "2G", "--replicas", "2").stdout \
        .strip() == "pgdata"
    listing = node.cli("volume", "ls").stdout
    assert "pgdata" in listing and "2G" in listing and "2/2" in listing
    [volume] = node.json("volume", "ls")
    assert volume["name"] == "pgdata" and volume["state"] == "detached"
    inspected = node.json("volume", "inspect", "pgdata")
    assert inspected["size"] == 2 << 30 and inspected["replica_count"] == 2
    replicas = inspected["replicas"]
    assert len({r["server"] for r in replicas}) == 2  # distinct data servers
    assert all(r["state"] == "in_sync" and r["path"] for r in replicas)
    assert inspected["used"] == 0  # thin: nothing written yet
    # the replica files exist on the chosen disks, and nowhere else
    holders = {r["path"] for r in replicas}
    for d in node.data_dirs:
        has = any((d / "replicas").glob(f"{inspected['id']}*"))
        assert has == (str(d) in holders)
    node.cli("volume", "rm", "pgdata")
    assert node.json("volume", "ls") == []
    for d in node.data_dirs:
        assert not any((d / "replicas").glob(f"{inspected['id']}*"))


def test_node_ls_shows_data_servers_and_capacity(node: Node) -> None:
    [info] = node.json("node", "ls")
    assert info["name"] == "node1" and info["health"] == "up"
    assert len(info["data_servers"]) == 3
    assert all(s["health"] == "up" and s["capacity"] > 0 for s in info["data_servers"])
    table = node.cli("node", "ls").stdout
    assert "node1" in table and "CAPACITY" in table


@pytest.mark.parametrize("args,code,message", [
    (["volume", "create", "", "--size", "1G"], 2, "empty"),
    (["volume", "create", "x" * 64, "--size", "1G"], 2, "longer than 63"),
    (["volume", "create", "../x", "--size", "1G"], 2, "not allowed"),
    (["volume", "create", "has space", "--size", "1G"], 2, "not allowed"),
    (["volume", "create", "v", "--size", "0"], 2, "greater than zero"),
    (["volume", "create", "v", "--size=-1G"], 2, "Invalid size"),
    (["volume", "create", "v", "--size", "abc"], 2, "Invalid size"),
    (["volume", "create", "v", "--size", "1E"], 2, "unknown unit"),
    (["volume", "create", "v", "--size", "1G", "--replicas", "4"], 4, "only 3 usable"),
    (["volume", "create", "v", "--size", "1G", "--replicas", "two"], 2, "whole number"),
    (["volume", "create", "v", "--size", "100M", "--fs", "xfs"], 2, "xfs needs"),
    (["volume", "create", "v", "--size", "1G", "--fs", "ntfs"], 2, "ext4, xfs"),
    (["volume", "attach", "nosuch"], 3, "does not exist"),
    (["volume", "rm", "nosuch"], 3, "does not exist"),
    (["volume", "inspect", "nosuch"], 3, "does not exist"),
])
def test_bad_input_is_refused_and_changes_nothing(shared_node: Node, args: list[str],
                                                  code: int, message: str) -> None:
    node = shared_node
    before = sorted(p.name for d in node.data_dirs for p in (d / "replicas").glob("*"))
    done = node.cli(*args, check=False)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert node.json("volume", "ls") == []
    after = sorted(p.name for d in node.data_dirs for p in (d / "replicas").glob("*"))
    assert after == before


def test_duplicate_create_is_refused(node: Node) -> None:
    node.cli("volume", "create", "dup", "--size", "64M")
    done = node.cli("volume", "create", "dup", "--size", "64M", check=False)
    assert done.returncode == 4 and "already exists" in done.stderr
    assert len(node.json("volume", "ls")) == 1  # type: ignore[arg-type]


def test_cli_without_a_node_says_so(tmp_path: object) -> None:
    done = subprocess.run([sys.executable, "-m", "cargohold.cli", "--host",
                           "unix:///nonexistent/api.sock", "volume", "ls"],
                          capture_output=True, text=True, env=_env())
    assert done.returncode == 5 and "Is 'cargohold node' running?" in done.stderr


def test_openapi_is_published(node: Node) -> None:
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(node.socket))) as client:
        spec = client.get("http://n/openapi.json").json()
    assert "/v1/volumes" in spec["paths"] and "/v1/volumes/{name}/attach" in spec["paths"]
    assert json.dumps(spec)  # serialisable


def test_tcp_api_needs_the_bearer_token(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "s3cret-of-twenty-chars"
    n = Node(tmp_path, data_servers=1, extra=("--api", f"tcp://127.0.0.1:{port}"),
             env={"CARGOHOLD_TOKEN": token})
    try:
        n.start()
        tcp = ["--host", f"tcp://127.0.0.1:{port}", "--ca", str(n.state / "tls" / "ca.crt")]
        base = [sys.executable, "-m", "cargohold.cli"]
        wrong, right = tmp_path / "wrong", tmp_path / "right"
        wrong.write_text("wrong-token-of-20-chars\n")
        right.write_text(token + "\n")
        # HTTPS only, with a certificate of the cluster CA
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v1/volumes", timeout=10)
        strange = subprocess.run([*base, "--host", f"tcp://127.0.0.1:{port}", "--ca",
                                  certifi.where(), "--token-file", str(right), "volume", "ls"],
                                 capture_output=True, text=True, env=_env())
        assert strange.returncode == 5 and "CERTIFICATE_VERIFY_FAILED" in strange.stderr
        refused = subprocess.run([*base, *tcp, "--token-file", str(wrong), "volume", "ls"],
                                 capture_output=True, text=True, env=_env())
        assert refused.returncode == 2 and "[unauthorized]" in refused.stderr
        ok = subprocess.run([*base, *tcp, "--token-file", str(right), "volume", "create", "t",
                             "--size", "64M", "--replicas", "1"],
                            capture_output=True, text=True, env=_env())
        assert ok.returncode == 0, ok.stderr
        assert [v["name"] for v in n.json("volume", "ls")] == ["t"]  # type: ignore[index]
        on_argv = subprocess.run([*base, *tcp, "--token", token, "volume", "ls"],
                                 capture_output=True, text=True, env=_env())
        assert on_argv.returncode == 2 and "--token" in on_argv.stderr  # no such flag
    finally:
        n.cleanup()


def test_node_refuses_a_short_token(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cargohold.cli", "node", "--state-dir",
                           str(tmp_path), "--api", "tcp://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60,
                          env={**_env(), "CARGOHOLD_TOKEN": "short"})
    assert done.returncode == 2 and "16 characters or more" in done.stderr
    assert not (tmp_path / "meta.db").exists()  # refused before anything started


def test_node_refuses_a_tcp_api_without_token(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cargohold.cli", "node", "--state-dir",
                           str(tmp_path), "--api", "tcp://127.0.0.1:1"],
                          capture_output=True, text=True, env=_env(), timeout=60)
    assert done.returncode == 2 and "needs a bearer token" in done.stderr


def test_sockets_are_never_open_to_other_users(tmp_path: Path) -> None:
    """Even under the most permissive umask a service manager could give the node."""
    n = Node(tmp_path, data_servers=1, umask=0)
    try:
        n.start()
        sockets = {p.name: p.lstat().st_mode for p in tmp_path.rglob("*")
                   if stat.S_ISSOCK(p.lstat().st_mode)}
        assert {"api.sock", "data.sock"} <= set(sockets)
        assert {name: oct(mode & 0o777) for name, mode in sockets.items()
                if mode & 0o007} == {}
    finally:
        n.cleanup()


def test_named_tokens_have_roles_and_every_change_is_audited(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tokens = tmp_path / "tokens"
    tokens.write_text("ops admin admin-secret-0123456789\n"
                      "grafana read-only reader-secret-0123456789\n")
    tokens.chmod(0o600)
    n = Node(tmp_path, data_servers=1, extra=("--api", f"tcp://127.0.0.1:{port}",
                                              "--tokens-file", str(tokens)))
    try:
        n.start()

        def cli(secret: str, *args: str) -> subprocess.CompletedProcess[str]:
            token_file = tmp_path / "mine"
            token_file.write_text(secret + "\n")
            return subprocess.run([sys.executable, "-m", "cargohold.cli", "--host",
                                   f"tcp://127.0.0.1:{port}", "--ca",
                                   str(n.state / "tls" / "ca.crt"), "--token-file", str(token_file),
                                   *args], capture_output=True, text=True, env=_env())

        assert cli("reader-secret-0123456789", "volume", "ls").returncode == 0
        refused = cli("reader-secret-0123456789", "volume", "create", "t", "--size", "64M",
                      "--replicas", "1")
        assert refused.returncode == 2 and "[forbidden]" in refused.stderr
        made = cli("admin-secret-0123456789", "volume", "create", "t", "--size", "64M",
                   "--replicas", "1")
        assert made.returncode == 0, made.stderr
        n.cli("volume", "rm", "t")  # over the unix socket
        audit = [json.loads(line) for line in (n.state / "audit.log").read_text().splitlines()]
        assert [(r["who"], r["method"], r["status"]) for r in audit] == [
            ("grafana", "POST", 403), ("ops", "POST", 201), ("local", "DELETE", 204)]
        assert audit[0]["peer"].startswith("127.0.0.1:")
        assert audit[2]["peer"].startswith(f"uid={os.getuid()},pid=")  # the CLI's process
    finally:
        n.cleanup()
