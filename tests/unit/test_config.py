from __future__ import annotations

from pathlib import Path

import pytest

from cargohold.cli import EXIT_OK, EXIT_WARNING, salvage_status, scrub_status
from cargohold.config import (
    DATASERVER_MODULE,
    ENGINE_MODULE,
    DataServerConfig,
    EngineConfig,
    parse_listen,
)
from cargohold.errors import InvalidArgument


def test_an_engine_reads_the_command_line_its_starter_wrote() -> None:
    config = EngineConfig(metadata="sqlite:///m.db", volume="pg", epoch=7, node="h1",
                          mountpoint=Path("/s/fuse"), ready_file=Path("/s/ready.json"),
                          heal_rate=1e6)
    argv = config.argv()
    assert argv[1:3] == ["-m", ENGINE_MODULE]
    assert EngineConfig.from_argv(argv[3:]) == config


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
