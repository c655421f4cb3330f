"""``cargohold node``: one host's long-running service.

It runs a data server per data directory, registers them and itself in the metadata store,
keeps a lease alive, recovers the agent's leftovers, serves the REST API (and the Docker
plugin and the CSI driver when configured), and on SIGTERM detaches what it attached and
stops its data servers. On SIGUSR2 it only stops itself, leaving the engines and data servers
running for the next node to adopt: an upgrade, which attached volumes do not notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from cargohold import __version__
from cargohold.adapters.csi.server import serve as serve_csi
from cargohold.adapters.dockerplugin import DockerPlugin
from cargohold.adapters.dockerplugin import create_app as create_plugin_app
from cargohold.adapters.metrics import Metrics
from cargohold.adapters.rest import Services, create_app
from cargohold.clients.access import Access
from cargohold.clients.dataclient import DataClient
from cargohold.clients.sockets import unix_listener
from cargohold.config import Endpoint, NodeConfig, TlsFiles, etcd_hosts, read_secret
from cargohold.core.iostats import IoRates
from cargohold.core.models import DataServer, Node, ServerState, liveness_key
from cargohold.core.periodic import Periodic
from cargohold.daemons.supervisor import DataServerProcess
from cargohold.errors import CargoholdError, InvalidArgument, LeaseExpired
from cargohold.services.agent import Agent
from cargohold.services.backups import BackupService
from cargohold.services.clones import CloneService
from cargohold.services.controller.controller import Controller
from cargohold.services.controller.scrub import Scrub
from cargohold.services.events import EventFeed
from cargohold.services.migrations import MigrationService
from cargohold.services.nodes import NodeRemoval
from cargohold.services.remotes import RemoteService
from cargohold.services.replication import ReplicationService
from cargohold.services.restores import RestoreService
from cargohold.services.schedules import BackupSchedules
from cargohold.services.snapshots import SnapshotService
from cargohold.services.standbys import StandbyService
from cargohold.services.volumes import VolumeService
from cargohold.stores.auditlog import AuditLog
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MetadataStore
from cargohold.stores.metered import MeteredStore
from cargohold.stores.opener import open_store
from cargohold.stores.pki import Credentials, ensure_own

log = logging.getLogger(__name__)

API_SOCKET_MODE = 0o660  # the REST API and the Docker plugin: root and its group


class _UnixPeerProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol naming the process at the other end of a unix socket
    (its uid and pid, from ``SO_PEERCRED``) as the request's client, for the audit log."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            self.client = (f"uid={uid},pid={pid}", 0)


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(app: ASGIApp, endpoint: Endpoint, tls: TlsFiles | None = None,
                 ) -> tuple[_ApiServer, asyncio.Task[None]]:
    """Serve ``app`` on ``endpoint`` inside this event loop; return once it listens. A unix
    socket is root's and its group's (0660) from the moment it exists; TCP is HTTPS with the
    node's certificate unless ``tls`` is None."""
    sockets = None
    if endpoint.is_unix:
        os.makedirs(os.path.dirname(endpoint.path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.path)  # a stale socket of a crashed node
        sockets = [unix_listener(endpoint.path, API_SOCKET_MODE)]
        uconfig = uvicorn.Config(app, log_level="warning", lifespan="off",
                                 http=_UnixPeerProtocol)
    else:
        uconfig = uvicorn.Config(app, host=endpoint.host, port=endpoint.port,
                                 log_level="warning", lifespan="off",
                                 ssl_certfile=str(tls.cert) if tls is not None else None,
                                 ssl_keyfile=str(tls.key) if tls is not None else None)
    server = _ApiServer(uconfig)
    task = asyncio.ensure_future(server.serve(sockets))
    while not server.started:
        if task.done():
            raise CargoholdError(detail=f"cannot serve on {endpoint.url}")
        await asyncio.sleep(0.01)
    return server, task


class NodeDaemon:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.processes: list[DataServerProcess] = []  # made in run(), with the credentials
        self.access: Access | None = None
        self.lease = 0
        self.started = time.time()
        self.agent: Agent | None = None  # once built: its engines' I/O goes in the node record
        self.io_rates = IoRates()
        self.controller: Controller  # made in run(), with the store

    async def run(self) -> None:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        credentials = _credentials(config)
        tls, key_file = config.tls_files()
        if credentials is not None:
            self.access = Access(tls=credentials.client_context(), node=config.name,
                                 key=credentials.cluster_key)
        self.processes = [
            DataServerProcess(path, config.data_host,
                              config.state_dir / "logs" / f"dataserver-{i}.log",
                              tls if credentials else None,
                              key_file if credentials else None, config.name)
            for i, path in enumerate(config.data_dirs)
        ]
        store = MeteredStore(open_store(
            config.metadata, tls if credentials else None,
            read_secret(config.etcd_password_file, "--etcd-password-file")))
        catalog = Catalog(store)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        handover = False

        def hand_over() -> None:
            nonlocal handover
            handover = True
            stop.set()

        loop.add_signal_handler(signal.SIGUSR2, hand_over)
        servers: list[tuple[_ApiServer, asyncio.Task[None]]] = []
        csi_server = None
        controlling: asyncio.Future[None] | None = None
        agent = Agent(catalog, config.name, config.state_dir, config.metadata,
                      config.rebuild_rate, config.scrub_rate, tls if credentials else None,
                      credentials.cluster_key if credentials else b"",
                      config.lease_ttl if etcd_hosts(config.metadata) else 0.0,
                      config.etcd_password_file, config.engine_metrics)
        self.agent = agent
        volumes = VolumeService(catalog, self.access)
        self.backups = BackupService(catalog, SnapshotService(catalog, self.access),
                                     self.access, config.name)
        self.schedules = BackupSchedules(self.backups)
        self.restores = RestoreService(self.backups, volumes)
        snapshots = SnapshotService(catalog, self.access)
        clones = CloneService(catalog, volumes, snapshots, self.access)
        remotes = RemoteService(catalog, self.access)
        self.replication = ReplicationService(snapshots, remotes, self.access)
        self.standbys = StandbyService(volumes, snapshots, clones, self.access)
        self.migrations = MigrationService(self.replication, config.name)
        self.controller = Controller(store, catalog, volumes, config.name,
                                     config.rebuild_after, config.scrub_every,
                                     config.scrub_rate, config.auto_rebalance,
                                     config.rebuild_rate, self.access, self.schedules,
                                     self.restores, self.replication)
        try:
            if credentials is not None:
                await _check_trust(catalog, credentials)
            for process in self.processes:
                await asyncio.to_thread(process.adopt_or_start)
            await self.check_once(store, catalog)
            await agent.recover()
            await self.migrations.recover()
            snapshots = SnapshotService(catalog, self.access)
            stale_after = max(config.lease_ttl, 3 * config.server_check_interval)
            services = Services(catalog, volumes, agent, self.controller,
                                Scrub(catalog, access=self.access),
                                EventFeed(store), NodeRemoval(catalog), config.name,
                                stale_after=stale_after,
                                snapshots=snapshots,
                                clones=clones,
                                backups=self.backups,
                                restores=self.restores,
                                schedules=self.schedules,
                                remotes=remotes, replication=self.replication,
                                standbys=self.standbys, migrations=self.migrations,
                                metrics=self._metrics(catalog, volumes, snapshots, agent,
                                                      store, stale_after))
            audit = AuditLog(config.state_dir / "audit.log")
            for endpoint in config.api:
                tokens = [] if endpoint.is_unix else config.api_tokens()
                servers.append(await _serve(create_app(services, tokens, audit), endpoint,
                                            tls if credentials else None))
            if config.docker_socket is not None:
                plugin = DockerPlugin(catalog, volumes, agent,
                                      config.state_dir / "docker-mounts.json", services.clones)
                await plugin.forget_detached()
                docker = Endpoint(url=f"unix://{config.docker_socket}")
                servers.append(await _serve(create_plugin_app(plugin, audit), docker))
            if config.csi_endpoint is not None:
                csi_server = await serve_csi(config.csi_endpoint.path, catalog, volumes, agent,
                                             lambda: services.ready, config.csi_kubelet_dir,
                                             services.snapshots, services.clones, audit)
            services.ready = True
            log.info("node %s ready: %d data servers, API on %s", config.name,
                     len(self.processes), ", ".join(e.url for e in config.api))
            # the controller's duties (a resync may copy for minutes) run beside the lease
            # keepalive, never in its way
            controlling = asyncio.ensure_future(
                self.controller.run_forever(config.server_check_interval, stop))
            await Periodic("node check", lambda: self.check_once(store, catalog),
                           config.server_check_interval, wait_first=True).run_forever(stop)
        finally:
            log.info("node %s stopping", config.name)
            self.controller.resign()
            if controlling is not None:
                controlling.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await controlling
            await self.controller.fill.stop()
            await self.backups.stop()
            await self.migrations.stop()
            await self.replication.stop_rounds()
            await self.standbys.close()
            if csi_server is not None:
                await csi_server.stop(5)
            for server, _ in servers:
                server.should_exit = True
            for _, task in servers:
                with contextlib.suppress(Exception):
                    await task
            sockets = [e.path for e in config.api if e.is_unix]
            if config.docker_socket is not None:
                sockets.append(str(config.docker_socket))
            if config.csi_endpoint is not None:
                sockets.append(config.csi_endpoint.path)
            for path in sockets:
                if path:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            if handover:  # the lease runs out by itself unless the next node renews it
                log.info("node %s hands over: its engines and data servers keep running for "
                         "the next node", config.name)
            else:
                await agent.detach_all()
                for process in self.processes:
                    await asyncio.to_thread(process.stop)
                await self._mark_stopped(catalog)
                if self.lease:
                    with contextlib.suppress(CargoholdError):
                        await store.revoke_lease(self.lease)
            await store.close()

    async def check_once(self, store: MetadataStore, catalog: Catalog) -> None:
        """Refresh the node's lease, restart dead data servers and refresh their records.

        The lease first: a record put while this node has no live lease (its first check,
        or after losing it) is one the controller may mark down at once, for a node that is
        in fact starting (seen: a volume created right after two nodes started was refused
        for want of a second data server)."""
        started = time.monotonic()
        ttl = self.config.lease_ttl
        if self.lease:
            try:
                ttl = await store.keepalive(self.lease)
            except LeaseExpired:
                log.error("node %s lost its lease: it counts as down until it has a new one",
                          self.config.name)
                self.controller.resign()
                self.lease = 0
        if not self.lease:
            self.lease = await store.grant_lease(self.config.lease_ttl)
            await store.put(liveness_key(self.config.name), b"", lease=self.lease)
        self.controller.renewed(self.lease, ttl, started)
        ids = []
        for process in self.processes:
            if not process.alive():
                log.error("data server at %s is not running; restarting it", process.path)
                process.restarts += 1
                await asyncio.to_thread(process.start)
            record = await self._describe(process)
            ids.append(record.id)
            await catalog.put_server(record)
        io = self.io_rates.update(self.agent.engine_io()) if self.agent is not None else {}
        await catalog.put_node(Node(name=self.config.name, version=__version__,
                                    api=",".join(e.url for e in self.config.api),
                                    data_servers=ids, started=self.started,
                                    io={name: {k: round(v, 1) for k, v in rates.items()}
                                        for name, rates in io.items()}))

    def _metrics(self, catalog: Catalog, volumes: VolumeService, snapshots: SnapshotService,
                 agent: Agent, store: MeteredStore, stale_after: float
                 ) -> Callable[[], Awaitable[bytes]]:
        """What answers GET /metrics."""
        exporter = Metrics(catalog, volumes, snapshots, self.config.name, stale_after)

        async def scrape() -> bytes:
            return await exporter.render(self.controller.lease_held, self.controller.leading,
                                         store.requests, agent.engine_io())

        return scrape

    async def _describe(self, process: DataServerProcess) -> DataServer:
        usage = shutil.disk_usage(process.path)
        record = DataServer(id=process.info["id"], node=self.config.name,
                            address=process.info["address"], path=str(process.path),
                            capacity=usage.total, free=usage.free,
                            max_provisioned=int(usage.total * self.config.overprovision))
        client = DataClient(record.address, record.id, call_timeout=2.0,  # the lease waits
                            access=self.access, peer=record.node)
        try:
            await client.connect(timeout=1.0)
            hello = await client.hello()
            record.used = int(hello.get("used", 0))
            record.provisioned = int(hello.get("provisioned", 0))
            record.reserve = int(hello.get("reserve", 0))
            faults = hello.get("faults", {})
            record.io_errors = int(faults.get("io_errors", 0))
            record.checksum_errors = int(faults.get("checksum_errors", 0))
            record.checksum_repaired = int(faults.get("repaired", 0))
        except CargoholdError as e:
            log.error("data server %s does not answer: %s", record.id, e)
            record.state = ServerState.DOWN
        finally:
            await client.close()
        return record

    async def _mark_stopped(self, catalog: Catalog) -> None:
        for process in self.processes:
            if process.info:
                with contextlib.suppress(CargoholdError):
                    record = await catalog.server(process.info["id"])
                    if record is not None:
                        record.state = ServerState.DOWN
                        await catalog.put_server(record)


def _credentials(config: NodeConfig) -> Credentials | None:
    """This node's TLS credentials and cluster key (made on first start when no TLS flag was
    given); None with ``--insecure-plaintext``."""
    if config.insecure_plaintext:
        log.warning("INSECURE: --insecure-plaintext: data servers take TCP connections "
                    "without TLS and I/O without capabilities; anyone who reaches their ports "
                    "can read, write and delete every replica")
        return None
    if config.own_tls:
        hosts = [config.data_host, *(e.host for e in config.api if not e.is_unix)]
        made_in, made = ensure_own(config.state_dir, config.name,
                                   [h for h in hosts if h not in ("0.0.0.0", "::")])
        if made:
            authority = config.state_dir / "pki"
            log.warning("made a cluster CA in %s and this node's certificate in %s. For "
                        "another node: `cargohold pki issue NAME --dir %s --out DIR`, copy DIR "
                        "to it and start it with --tls-dir DIR", authority, made_in, authority)
    files, key_file = config.tls_files()
    credentials = Credentials.load(files.ca, files.cert, files.key, key_file)
    if credentials.name != config.name:
        raise InvalidArgument(what="TLS credentials",
                              detail=f"{files.cert} was issued to node {credentials.name!r}, "
                                     f"this node is {config.name!r}: issue it its own with "
                                     f"`cargohold pki issue {config.name}`")
    return credentials


async def _check_trust(catalog: Catalog, credentials: Credentials) -> None:
    """Refuse to join a cluster whose CA or cluster key is not ours (the first node to
    start records their fingerprints): its hosts could not talk to ours."""
    ours = {"ca": credentials.ca_fingerprint, "cluster_key": credentials.key_id}
    held = await catalog.claim_trust(ours)
    if held != ours:
        raise InvalidArgument(
            what="TLS credentials",
            detail=f"the cluster uses CA {held.get('ca', '?')[:16]}... and cluster key "
                   f"{held.get('cluster_key', '?')}, this node CA {ours['ca'][:16]}... and key "
                   f"{ours['cluster_key']}. Issue this node's credentials from the cluster's "
                   "CA (`cargohold pki issue NAME` where it was made) and start it with "
                   "--tls-dir")
