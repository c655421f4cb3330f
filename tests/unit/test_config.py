from __future__ import annotations

from pathlib import Path

import pytest

from cargohold.cli import EXIT_OK, EXIT_WARNING, parser, salvage_status, scrub_status
from cargohold.cli.node import node_config
from cargohold.config import (
    DATASERVER_MODULE,
    DEFAULT_DOCKER_SOCKET,
    DEFAULT_STATE_DIR,
    ENGINE_MODULE,
    DataServerConfig,
    EngineConfig,
    NodeConfig,
    TlsFiles,
    parse_listen,
)
from cargohold.errors import InvalidArgument
from tests.conftest import ROOT


def test_an_engine_reads_the_command_line_its_starter_wrote() -> None:
    tls = TlsFiles(ca=Path("/t/ca.crt"), cert=Path("/t/node.crt"), key=Path("/t/node.key"))
    for extra in ({}, {"tls": tls, "capability_file": Path("/s/capability.json")}):
        config = EngineConfig(metadata="sqlite:///m.db", volume="pg", epoch=7, node="h1",
                              mountpoint=Path("/s/fuse"), ready_file=Path("/s/ready.json"),
                              heal_rate=1e6, **extra)
        argv = config.argv()
        assert argv[1:3] == ["-m", ENGINE_MODULE]
        assert EngineConfig.from_argv(argv[3:]) == config
        assert ("--insecure-plaintext" in argv) == (config.tls is None)


def test_a_node_with_etcd_on_other_hosts_is_reachable_and_not_in_the_clear(
        tmp_path: Path) -> None:
    remote = "etcds://10.250.0.1:2379,10.250.0.2:2379"
    # the data servers' address defaults to the one facing the etcd members, never loopback
    try:
        node = NodeConfig(state_dir=tmp_path, metadata=remote)
        assert node.data_host and not node.data_host.startswith("127.")
    except InvalidArgument as e:  # a machine without any route out
        assert "no route" in str(e)
    with pytest.raises(InvalidArgument, match="cannot be reached from the other hosts"):
        NodeConfig(state_dir=tmp_path, metadata=remote, data_host="127.0.0.1")
    with pytest.raises(InvalidArgument, match="plaintext across hosts"):
        NodeConfig(state_dir=tmp_path, metadata="etcd://10.250.0.1:2379", data_host="10.0.0.5")
    plain = NodeConfig(state_dir=tmp_path, metadata="etcd://10.250.0.1:2379",
                       data_host="10.0.0.5", insecure_plaintext=True)
    assert plain.insecure_plaintext
    local = NodeConfig(state_dir=tmp_path, metadata="etcd://127.0.0.1:2379")
    assert local.data_host == "127.0.0.1"
    assert NodeConfig(state_dir=tmp_path).data_host == "127.0.0.1"


def test_a_lease_too_short_for_etcd_requests_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="too short with etcd"):
        NodeConfig(state_dir=tmp_path, metadata="etcd://127.0.0.1:2379", lease_ttl=2.5)
    assert NodeConfig(state_dir=tmp_path, metadata="etcd://127.0.0.1:2379", lease_ttl=3)
    assert NodeConfig(state_dir=tmp_path, lease_ttl=2)  # SQLite on this host: no requests


def test_a_data_server_reads_the_command_line_its_starter_wrote() -> None:
    config = DataServerConfig(root=Path("/d"), host="10.0.0.1", port=0,
                              ready_file=Path("/d/process.json"))
    argv = config.argv()
    assert argv[1:3] == ["-m", DATASERVER_MODULE]
    assert DataServerConfig.from_argv(argv[3:]) == config


@pytest.mark.parametrize("argv", [
    ["--volume", "v"],  # the rest is missing
    ["--metadata", "m", "--volume", "v", "--epoch", "x", "--node", "n", "--mountpoint", "/m",
     "--ready-file", "/r"],
    ["--metadata", "m", "--volume", "v", "--epoch", "-1", "--node", "n", "--mountpoint", "/m",
     "--ready-file", "/r"],
])
def test_bad_engine_arguments_are_a_clear_error(argv: list[str]) -> None:
    with pytest.raises(InvalidArgument):
        EngineConfig.from_argv(argv)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:7000") == ("::1", 7000)
    for bad in ("nohost", "h:99999", "h:x"):
        with pytest.raises(InvalidArgument):
            parse_listen(bad)
    with pytest.raises(InvalidArgument):
        DataServerConfig.from_argv(["--dir", "/d", "--listen", "h:x"])


def test_scrub_and_salvage_warn_when_a_person_must_look() -> None:
    clean = {"lost": [], "skipped": [], "repaired": [{"chunk": 1, "server": "s"}]}
    assert scrub_status(clean) == EXIT_OK
    assert scrub_status({**clean, "lost": [3]}) == EXIT_WARNING
    assert scrub_status({**clean, "skipped": ["s2"]}) == EXIT_WARNING
    done = {"in_sync": "s1", "chunks_newer_elsewhere": 0, "unreachable": []}
    assert salvage_status(done) == EXIT_OK
    assert salvage_status({**done, "chunks_newer_elsewhere": 2}) == EXIT_WARNING
    assert salvage_status({**done, "unreachable": ["s3"]}) == EXIT_WARNING


def test_the_etcd_client_asks_the_member_on_this_host_first() -> None:
    from cargohold.stores.etcd import EtcdStore

    store = EtcdStore(["10.250.0.1:2379", "10.250.0.2:2379", "127.0.0.1:2379"])
    assert store.url == "etcd://127.0.0.1:2379,10.250.0.1:2379,10.250.0.2:2379"


def node_args(tmp_path: Path, toml: str | None, *flags: str) -> NodeConfig:
    """The configuration ``cargohold node FLAGS`` runs with (``--config`` a file of ``toml``)."""
    if toml is not None:
        (tmp_path / "node.toml").write_text(toml)
        flags = ("--config", str(tmp_path / "node.toml"), *flags)
    return node_config(parser.build().parse_args(["node", *flags]))


def test_the_node_reads_its_settings_from_a_file_and_flags_win(tmp_path: Path) -> None:
    config = node_args(tmp_path, """
state-dir = "/srv/cargohold"
data-dir = ["/srv/disk1", "/srv/disk2"]
api = ["unix:///run/ch.sock"]
rebuild-after = 30
overprovision = 1.5
auto-rebalance = true
no-engine-metrics = true
rebuild-rate = "200M"
docker-socket = "none"
""", "--rebuild-after", "90", "--data-dir", "/mnt/d")
    assert config.state_dir == Path("/srv/cargohold")
    assert config.metadata == "sqlite:///srv/cargohold/meta.db"
    assert config.data_dirs == [Path("/mnt/d")]  # the flag's list replaces the file's
    assert config.rebuild_after == 90.0 and config.overprovision == 1.5
    assert config.auto_rebalance and not config.engine_metrics
    assert config.rebuild_rate == 200 << 20 and config.docker_socket is None
    assert [e.url for e in config.api] == ["unix:///run/ch.sock"]
    plain = node_args(tmp_path, None)  # no file: the defaults, as before
    assert plain.state_dir == DEFAULT_STATE_DIR and plain.data_dirs == []
    assert plain.engine_metrics and plain.rebuild_after == 600.0
    assert plain.docker_socket == DEFAULT_DOCKER_SOCKET


@pytest.mark.parametrize(("toml", "message"), [
    ("data-dirs = ['/srv']", "unknown key 'data-dirs'"),
    ("rebuild-after = '10'", "rebuild-after = '10': want a number"),
    ("auto-rebalance = 1", "want true or false"),
    ("data-dir = '/srv'", "want a list of strings"),
    ("api = [1]", "want a list of strings"),
    ("state-dir = ", "not TOML"),
    ("overprovision = -1", "overprovision"),
])
def test_a_bad_settings_file_is_a_clear_error(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        node_args(tmp_path, toml)


def test_a_missing_settings_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="nowhere.toml: No such file"):
        node_config(parser.build().parse_args(["node", "--config", str(tmp_path /
                                                                      "nowhere.toml")]))


def test_the_packages_settings_file_is_valid() -> None:
    config = node_args(Path("/nonexistent"), None, "--config",
                       str(ROOT / "deploy" / "debian" / "node.toml"))
    assert config.state_dir == DEFAULT_STATE_DIR and len(config.data_dirs) == 3
    assert [e.url for e in config.api] == ["unix:///run/cargohold/api.sock"]
