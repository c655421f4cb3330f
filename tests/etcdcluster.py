"""Real etcd clusters on 127.0.0.1 for integration tests.

``EtcdCluster(base, size)`` starts ``size`` members of the installed etcd (Debian's
``etcd-server``: ``/usr/bin/etcd``, or ``$CARGOHOLD_ETCD``) on free ports, each with its own
data dir under ``base``, waits until every member is healthy (bounded, no fixed sleeps) and
can kill and restart members. ``close()`` kills every process it started and removes ``base``;
the fixtures below call it whatever the test did. Use the fixtures by importing them into a
test module: ``from tests.etcdcluster import etcd1, etcd3  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cargohold.stores import pki

ETCD = os.environ.get("CARGOHOLD_ETCD", "/usr/bin/etcd")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (etcd may still lose a race: the
    cluster then starts again on new ports)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdMember:
    """One etcd process: its ports, data dir and log."""

    def __init__(self, name: str, base: Path, client_port: int, peer_port: int,
                 tls: Path | None = None) -> None:
        self.name = name
        self.tls = tls  # credentials (``cargohold pki issue``): TLS for clients and peers
        self.scheme = "https" if tls is not None else "http"
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = base / name
        self.log = base / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client API."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, initial_cluster: str, heartbeat_ms: int, election_ms: int) -> None:
        argv = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",  # ignored once the data dir exists
            "--initial-cluster-token", f"cargohold-test-{os.getpid()}",
            "--heartbeat-interval", str(heartbeat_ms),
            "--election-timeout", str(election_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--enable-v2=false",
        ]  # fmt: skip
        if self.tls is not None:
            files = ["ca.crt", "node.crt", "node.key"]
            ca, cert, key = (str(self.tls / f) for f in files)
            argv += ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca,
                     "--client-cert-auth", "--peer-cert-file", cert, "--peer-key-file", key,
                     "--peer-trusted-ca-file", ca, "--peer-client-cert-auth"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def kill(self) -> None:
        """SIGKILL the member (no clean shutdown) and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def healthy(self, client: httpx.Client) -> bool:
        """Whether the member answers /health with a leader and no alarm."""
        try:
            r = client.get(f"{self.client_url}/health", timeout=0.5)
            return r.status_code == 200 and r.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def status(self, client: httpx.Client) -> dict[str, str] | None:
        """The member's maintenance status (member id, leader id) or None."""
        try:
            r = client.post(f"{self.client_url}/v3/maintenance/status", json={}, timeout=0.5)
            if r.status_code != 200:
                return None
            body = r.json()
            return {"member_id": body["header"]["member_id"], "leader": body.get("leader", "0")}
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def logs(self, limit: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1 with data under ``base`` (removed by close()).

    ``heartbeat_ms``/``election_ms`` are etcd's ``--heartbeat-interval`` and
    ``--election-timeout`` (etcd's defaults 100/1000). They also set etcd's smallest lease
    TTL: ceil(1.5 * election timeout), so 2 s with the defaults and 1 s below 667 ms.
    """

    def __init__(
        self, base: Path, size: int = 1, *, heartbeat_ms: int = 100, election_ms: int = 1000,
        tls: Path | None = None,
    ) -> None:
        """``tls``: a credentials folder (``cargohold pki issue NAME --host 127.0.0.1``) the
        members serve clients and each other with, asking for certificates of its CA."""
        if size < 1:
            raise ValueError("a cluster needs at least one member")
        self.base = base
        self.tls = tls
        self.size = size
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.members: list[EtcdMember] = []
        if tls is None:
            self._http = httpx.Client()
        else:
            context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
            context.load_cert_chain(tls / "node.crt", tls / "node.key")
            self._http = httpx.Client(verify=context)

    # -- addresses

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The metadata URL for open_store: ``etcd[s]://host:port,host:port,...``."""
        return ("etcds://" if self.tls else "etcd://") + ",".join(self.endpoints)

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    # -- lifecycle

    def start(self, timeout: float = 20.0) -> None:
        """Start every member and wait until all are healthy; try new ports if etcd lost a
        race for one."""
        for attempt in range(3):
            ports = _free_ports(2 * self.size)
            self.base.mkdir(parents=True, exist_ok=True)
            self.members = [
                EtcdMember(f"m{i}", self.base, ports[2 * i], ports[2 * i + 1], self.tls)
                for i in range(self.size)
            ]
            for m in self.members:
                m.start(self.initial_cluster, self.heartbeat_ms, self.election_ms)
            try:
                self.wait_healthy(timeout=timeout)
                return
            except RuntimeError:
                busy = any("address already in use" in m.logs() for m in self.members)
                if not busy or attempt == 2:
                    raise
                self.kill_all()
                for m in self.members:
                    shutil.rmtree(m.data_dir, ignore_errors=True)
                    m.log.unlink(missing_ok=True)

    def wait_healthy(self, indexes: list[int] | None = None, timeout: float = 20.0) -> float:
        """Wait until the given members (default: all running ones) are healthy; return the
        seconds it took. RuntimeError with the logs if that takes longer than ``timeout``."""
        start = time.monotonic()
        members = (
            [self.members[i] for i in indexes]
            if indexes is not None
            else [m for m in self.members if m.running]
        )
        delay = 0.01
        while True:
            for m in members:
                if not m.running:
                    raise RuntimeError(f"etcd member {m.name} exited:\n{self.logs()}")
            if all(m.healthy(self._http) for m in members):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"etcd not healthy within {timeout}s:\n{self.logs()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def leader(self, timeout: float = 10.0) -> int:
        """The index of the current leader, as the running members agree on it."""
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[str, int] = {}
            leaders = set()
            for i, m in enumerate(self.members):
                if not m.running:
                    continue
                status = m.status(self._http)
                if status is not None:
                    ids[status["member_id"]] = i
                    leaders.add(status["leader"])
            if len(leaders) == 1 and (lead := leaders.pop()) in ids:
                return ids[lead]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no agreed etcd leader within {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def kill(self, index: int) -> None:
        """SIGKILL one member (its data dir stays, so restart() brings it back)."""
        self.members[index].kill()

    def restart(self, index: int) -> None:
        """Start a killed member again on the same ports and data dir (does not wait)."""
        m = self.members[index]
        if m.running:
            raise RuntimeError(f"etcd member {m.name} is still running")
        m.start(self.initial_cluster, self.heartbeat_ms, self.election_ms)

    def kill_all(self) -> None:
        for m in self.members:
            m.kill()

    def logs(self) -> str:
        return "\n".join(f"== etcd {m.name} ({m.endpoint})\n{m.logs()}" for m in self.members)

    def close(self) -> None:
        """Kill every member and remove the data dirs and logs. Idempotent."""
        try:
            self.kill_all()
        finally:
            self._http.close()
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def etcd_available() -> bool:
    return os.access(ETCD, os.X_OK)


needs_etcd = pytest.mark.skipif(
    not etcd_available(), reason=f"etcd not installed at {ETCD} (scripts/install-deps.sh --test)"
)


def _cluster(request: pytest.FixtureRequest, size: int, tls: Path | None = None,
             **kwargs: int) -> Iterator[EtcdCluster]:
    base = Path(tempfile.mkdtemp(prefix=f"cargohold-etcd{size}-"))
    cluster = EtcdCluster(base, size, tls=tls, **kwargs)
    failed_before = request.session.testsfailed
    try:
        cluster.start()
        yield cluster
    finally:
        if request.session.testsfailed > failed_before:
            show_past_capture(request, f"\n--- etcd logs of {request.node.nodeid} ---\n"
                                       f"{cluster.logs()}\n")
        cluster.close()


def show_past_capture(request: pytest.FixtureRequest, text: str) -> None:
    """Write past pytest's capture (a fixture's teardown output is not shown otherwise)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        sys.stderr.write(text)
        return
    with capman.global_and_fixture_disabled():
        sys.stderr.write(text)


@pytest.fixture
def etcd1(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    """A fresh one-member etcd (store revision 0). Election timeout 500 ms, so that its
    smallest lease TTL is 1 s (etcd's default of 1000 ms makes it 2 s)."""
    yield from _cluster(request, 1, heartbeat_ms=50, election_ms=500)


@pytest.fixture
def etcd3(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    """A fresh three-member etcd with etcd's default raft timing (100/1000 ms)."""
    yield from _cluster(request, 3)


@pytest.fixture(scope="session")
def etcd_credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster CA and credentials for 127.0.0.1, shared by etcd members and clients."""
    base = tmp_path_factory.mktemp("etcd-pki")
    pki.init_authority(base / "ca")
    pki.issue(base / "ca", "etcd", base / "etcd", ["127.0.0.1"])
    return base / "etcd"


@pytest.fixture
def etcd1_tls(request: pytest.FixtureRequest, etcd_credentials: Path) -> Iterator[EtcdCluster]:
    """``etcd1`` serving TLS only, with client certificates of its CA required."""
    yield from _cluster(request, 1, tls=etcd_credentials, heartbeat_ms=50, election_ms=500)
