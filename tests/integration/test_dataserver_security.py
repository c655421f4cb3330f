"""A data server as a node runs it (TLS with the cluster CA, capabilities on the data path)
against strangers: a plain socket, a certificate of another CA, a node's certificate without
a capability, a capability of another node, one signed with another key, a forged epoch."""

from __future__ import annotations

import asyncio
import os
import ssl
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from cargohold.clients.access import Access
from cargohold.clients.dataclient import DataClient
from cargohold.core import wire
from cargohold.core.capability import Capability
from cargohold.errors import DataServerUnavailable, Fenced, NotAuthorized
from cargohold.stores import pki
from cargohold.stores.pki import Credentials
from tests.conftest import plain_hello
from tests.integration.test_dataserver import ServerProcess

T = TypeVar("T")
MIB = 1 << 20
NODE = "node-a"


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pki")
    pki.init_authority(base / "ca")
    for name in (NODE, "node-b"):
        pki.issue(base / "ca", name, base / name)
    pki.init_authority(base / "other-ca")
    pki.issue(base / "other-ca", NODE, base / "stranger")  # the right name, another CA
    return base


@pytest.fixture
def server(tmp_path: Path, authority: Path) -> Iterator[ServerProcess]:
    own = authority / NODE
    process = ServerProcess(tmp_path, extra=(
        "--tls-ca", str(own / "ca.crt"), "--tls-cert", str(own / "node.crt"),
        "--tls-key", str(own / "node.key"), "--cluster-key", str(own / "cluster.key"),
        "--node", NODE))
    try:
        process.start()
        yield process
    finally:
        process.kill()
        if process.log.exists():
            print(process.log.read_text(errors="replace")[-20_000:])


def access(directory: Path) -> Access:
    creds = Credentials.from_dir(directory)
    return Access(tls=creds.client_context(), node=creds.name, key=creds.cluster_key)


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(body(), 60))


def test_a_node_with_its_capabilities_does_everything(server: ServerProcess,
                                                      authority: Path) -> None:
    vid = uuid.uuid4().hex

    async def body() -> None:
        async with DataClient(server.address, "s", access=access(authority / NODE),
                              peer=NODE) as client:
            assert (await client.hello())["id"]
            await client.create(vid, 4 * MIB)
            await client.write(vid, 3, 0, b"x" * 4096, 1)
            assert await client.read(vid, 3, 0, 4096) == b"x" * 4096
            await client.flush(vid, 3)
            await client.fence(vid, 4)  # a higher epoch, signed: the replica moves on
            with pytest.raises(Fenced):
                await client.write(vid, 3, 0, b"y" * 4096, 2)
            assert (await client.stat(vid))["epoch"] == 4

    run(body)


def test_a_plain_socket_gets_nothing(server: ServerProcess) -> None:
    assert wire.MAGIC not in plain_hello(server.address)  # a TLS alert at most, no answer


def test_certificates_of_another_ca_or_none_are_refused(server: ServerProcess,
                                                        authority: Path) -> None:
    async def body() -> None:
        stranger = DataClient(server.address, "s", access=access(authority / "stranger"),
                              peer=NODE)
        with pytest.raises(DataServerUnavailable):
            await stranger.connect()
            await stranger.hello(timeout=5)  # TLS 1.3: the server's refusal may come later
        await stranger.close()
        # trusts the server, shows no certificate of its own
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.load_verify_locations(authority / NODE / "ca.crt")
        nameless = DataClient(server.address, "s", access=Access(tls=anonymous), peer=NODE)
        with pytest.raises(DataServerUnavailable):
            await nameless.connect()
            await nameless.hello(timeout=5)
        await nameless.close()

    run(body)


def test_a_server_must_show_the_node_expected(server: ServerProcess, authority: Path) -> None:
    async def body() -> None:
        client = DataClient(server.address, "s", access=access(authority / NODE),
                            peer="node-b")  # the address was node-b's: not this server
        with pytest.raises(DataServerUnavailable, match="TLS"):
            await client.connect()
        await client.close()

    run(body)


def test_io_needs_a_capability_of_the_cluster_for_that_node_and_epoch(
        server: ServerProcess, authority: Path) -> None:
    vid = uuid.uuid4().hex
    own = Credentials.from_dir(authority / NODE)
    other_key = Credentials.from_dir(authority / "stranger").cluster_key

    async def body() -> None:
        async with DataClient(server.address, "s", access=access(authority / NODE),
                              peer=NODE) as admin:
            await admin.create(vid, 4 * MIB)
            await admin.write(vid, 5, 0, b"a" * 4096, 1)
        tls = own.client_context()
        cases = {
            "no capability": Access(tls=tls),
            "another node's": Access(tls=tls, granted={
                (vid, 5): Capability(vid, 5, "node-b").sign(own.cluster_key)}),
            "another key's": Access(tls=tls, granted={
                (vid, 5): Capability(vid, 5, NODE).sign(other_key)}),
            "another epoch's": Access(tls=tls, granted={
                (vid, 5): Capability(vid, 6, NODE).sign(own.cluster_key)}),
        }
        for case, held in cases.items():
            async with DataClient(server.address, "s", access=held, peer=NODE) as client:
                with pytest.raises(NotAuthorized):
                    await client.read(vid, 5, 0, 4096)
                with pytest.raises(NotAuthorized):
                    await client.write(vid, 5, 0, b"b" * 4096, 2)
                with pytest.raises(NotAuthorized):
                    await client.fence(vid, (1 << 64) - 1)  # the old way to lock everyone out
                assert (await client.stat(vid))["epoch"] == 5, case
        # an engine holds only its attachment's capability: no other epoch
        engine = Access(tls=tls, node=NODE,
                        granted={(vid, 5): Capability(vid, 5, NODE).sign(own.cluster_key)})
        async with DataClient(server.address, "s", access=engine, peer=NODE) as client:
            assert await client.read(vid, 5, 0, 4096) == b"a" * 4096
            with pytest.raises(NotAuthorized):
                await client.write(vid, 6, 0, b"c" * 4096, 3)
            assert (await client.stat(vid))["epoch"] == 5

    run(body)


def test_the_unix_socket_takes_only_this_nodes_capabilities(server: ServerProcess,
                                                            authority: Path) -> None:
    vid = uuid.uuid4().hex
    local = str(server.root / wire.LOCAL_SOCKET)
    assert os.path.exists(local)

    async def body() -> None:
        mine, theirs = access(authority / NODE), access(authority / "node-b")
        async with DataClient(server.address, "s", local, access=mine) as client:
            await client.create(vid, 4 * MIB)
            await client.write(vid, 1, 0, b"u" * 4096, 1)
        async with DataClient(server.address, "s", local, access=theirs) as client:
            with pytest.raises(NotAuthorized):
                await client.read(vid, 1, 0, 4096)

    run(body)


def test_a_snapshot_reads_capability_reads_snapshots_and_nothing_else(
        server: ServerProcess, authority: Path) -> None:
    """What a clone's engine holds for its source: epoch 0, which fences nobody."""
    vid, snap = uuid.uuid4().hex, uuid.uuid4().hex
    own = Credentials.from_dir(authority / NODE)

    async def body() -> None:
        async with DataClient(server.address, "s", access=access(authority / NODE),
                              peer=NODE) as admin:
            await admin.create(vid, 4 * MIB)
            await admin.write(vid, 7, 0, b"s" * 4096, 1)
            await admin.snapshot(vid, 7, snap, 1.0)
            await admin.write(vid, 7, 0, b"h" * 4096, 2)
        reader = Access(tls=own.client_context(), node=NODE, granted={
            (vid, 0): Capability(vid, 0, NODE).sign(own.cluster_key)})
        async with DataClient(server.address, "s", access=reader, peer=NODE) as client:
            assert await client.read_snapshot(vid, 0, snap, 0, 4096) == b"s" * 4096
            with pytest.raises(NotAuthorized):
                await client.read(vid, 7, 0, 4096)
            with pytest.raises(NotAuthorized):
                await client.write(vid, 7, 0, b"x" * 4096, 3)
            with pytest.raises(NotAuthorized):
                await client.fill(vid, 7, 0, b"x" * 4096, 1)
            with pytest.raises(NotAuthorized):
                await client.read_snapshot(vid, 7, snap, 0, 4096)
            assert (await client.stat(vid))["epoch"] == 7  # nobody fenced
        stranger = Access(tls=own.client_context(), node=NODE, granted={
            (vid, 0): Capability(vid, 0, "node-b").sign(own.cluster_key)})
        async with DataClient(server.address, "s", access=stranger, peer=NODE) as client:
            with pytest.raises(NotAuthorized):
                await client.read_snapshot(vid, 0, snap, 0, 4096)

    run(body)
