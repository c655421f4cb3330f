"""The REST API (OpenAPI at /openapi.json), served by every node.

Error codes map to HTTP statuses here and nowhere else. On TCP the API needs a bearer
token; on the local unix socket, file permissions guard it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cargohold import __version__
from cargohold.adapters.rest.replication import router as replication_router
from cargohold.adapters.rest.views import node_view, volume_view
from cargohold.config import ApiToken
from cargohold.core.models import DataServer, Volume
from cargohold.errors import (
    BackupNotFound,
    CargoholdError,
    Forbidden,
    InvalidArgument,
    Kind,
    NodeNotFound,
    SnapshotNotFound,
    Unauthorized,
)
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
from cargohold.services.snapshots import SnapshotService, snapshot_view
from cargohold.services.standbys import StandbyService
from cargohold.services.volumes import VolumeService
from cargohold.stores.auditlog import AuditLog
from cargohold.stores.catalog import Catalog

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # everything else changes something
HTTP_STATUS = {
    Kind.INVALID: 400,
    Kind.NOT_FOUND: 404,
    Kind.CONFLICT: 409,
    Kind.FENCED: 409,
    Kind.NO_SPACE: 507,
    Kind.UNAVAILABLE: 503,
    Kind.INTERNAL: 500,
}


class ErrorBody(BaseModel):
    code: str  # stable: see errors.py
    message: str  # what happened and what to do next


class Error(BaseModel):
    error: ErrorBody


#: Every error status an operation may answer, with the one body they all share.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Error, "description": text} for status, text in (
        (400, "bad input (invalid_argument, invalid_name, invalid_size, ...)"),
        (401, "a bearer token is needed (TCP)"), (403, "the token is read-only"),
        (404, "no such volume or node"), (409, "conflicts with the current state"),
        (500, "an internal error"), (503, "a node, data server or the metadata store is down"),
        (507, "out of space"))}


def _with_bearer(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of a TCP API: every operation but /healthz wants the token."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        schema["paths"]["/healthz"]["get"]["security"] = []
        app.openapi_schema = schema
    return app.openapi_schema


# The document states what a good value looks like (``json_schema_extra``: documented, not
# enforced here, so that a bad one gets cargohold's own message and code, not pydantic's).
NAME_DOC = Field(json_schema_extra={"pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
                                    "examples": ["pgdata"]})
SIZE_DOC = Field(json_schema_extra=lambda schema: schema.update(
    anyOf=[{"type": "string", "pattern": "^[1-9][0-9]{0,5}[MGT]?$"},
           {"type": "integer", "minimum": 16 << 20, "maximum": 64 << 40}],
    examples=["2G", "512M", 1073741824]))
REPLICAS_DOC = Field(default=2, json_schema_extra=lambda schema: schema.update(
    anyOf=[{"type": "integer", "minimum": 1, "maximum": 5},
           {"type": "string", "pattern": "^[1-5]$"}]))


class CreateVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = NAME_DOC
    size: str | int = SIZE_DOC
    replicas: int | str = REPLICAS_DOC
    fs: str = Field(default="ext4", json_schema_extra={"enum": ["ext4", "xfs"]})
    exist_ok: bool = False
    encrypt: bool = False  # encrypted at rest, with ``key`` or a new random key
    locality: str = Field(default="best-effort", json_schema_extra={
        "enum": ["best-effort", "strict", "off"],
        "description": "best-effort: a replica is moved to the node the volume is attached "
                       "on; strict: also no attach where none can be; off: replicas stay"})
    key: str | None = Field(default=None, repr=False, json_schema_extra={
        "description": "the volume key: 64 bytes as 128 hex digits (implies encrypt)",
        "pattern": "^[0-9a-fA-F]{128}$"})


class CreateClone(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = NAME_DOC
    source: str = Field(alias="from", json_schema_extra={
        "description": "VOLUME@SNAPSHOT, or VOLUME for its current contents",
        "examples": ["pgdata@before-upgrade"]})
    size: str | int | None = Field(default=None, json_schema_extra={
        "description": "default: the snapshot's size; larger grows the clone"})
    replicas: int | str | None = Field(default=None, json_schema_extra={
        "description": "default: the source's replica count"})
    exist_ok: bool = False


class UpdateVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int | str | None = Field(default=None, json_schema_extra=lambda schema: schema.update(
        anyOf=[{"type": "integer", "minimum": 1, "maximum": 5},
               {"type": "string", "pattern": "^[1-5]$"}],
        description="replicas to keep; changed online, never below the smaller count"))
    locality: str | None = Field(default=None, json_schema_extra={
        "enum": ["best-effort", "strict", "off"],
        "description": "best-effort: a replica is moved to the node the volume is attached "
                       "on; strict: also no attach where none can be; off: replicas stay"})


class MoveVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(json_schema_extra={"description": "the node to hold a replica"})


class CreateGroupSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(json_schema_extra={"description": "the group's name, and each "
                                         "member snapshot's (VOLUME@NAME)"})
    volumes: list[str] = Field(min_length=1, max_length=64)
    freeze: bool = True


class RevertVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(json_schema_extra={"description": "VOLUME@SNAPSHOT of this volume"})


class CreateSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(json_schema_extra={"description": "unique among the volume's snapshots"})
    freeze: bool = Field(default=True, json_schema_extra={
        "description": "freeze the mounted file system around the cut (FIFREEZE), so that "
                       "a clone mounts without journal replay"})


class SetBackupTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(json_schema_extra={"description": "s3://BUCKET/PREFIX",
                                        "examples": ["s3://backups/cluster-a"]})
    endpoint: str = Field(default="", json_schema_extra={
        "description": "an S3-compatible server's URL (default: AWS)"})
    region: str = ""
    key: str | None = Field(default=None, repr=False, json_schema_extra={
        "description": "the encryption key file's contents as hex (at least 32 bytes): "
                       "blocks sealed with AES-256-GCM, names keyed",
        "pattern": "^([0-9a-fA-F]{2}){32,1024}$"})


class CreateBackup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    volume: str = NAME_DOC
    snapshot: str = Field(default="", json_schema_extra={
        "description": "back up this snapshot of the volume (default: one taken now)"})
    wait: bool = False


class ScheduleBackups(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: str | int = Field(json_schema_extra={
        "description": "seconds, or a number with s, m, h or d (at least 60 s)",
        "examples": ["1h"]})
    keep: int = Field(default=0, ge=0, le=10_000, json_schema_extra={
        "description": "backups of the volume kept (the newest); 0: all"})


class RestoreBackup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(json_schema_extra={"description": "the new volume's name"})
    replicas: int | str | None = Field(default=None, json_schema_extra={
        "description": "default: 2"})
    standby: bool = Field(default=False, json_schema_extra={
        "description": "follow the later backups of the same volume; not attachable until "
                       "POST /v1/volumes/{name}/activate"})
    wait: bool = False


class ResizeVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: str | int = SIZE_DOC


@dataclass
class Services:
    """What the API serves from; built by the node (``daemons/node.py``), never here."""

    catalog: Catalog
    volumes: VolumeService
    agent: Agent
    controller: Controller  # its duties (rebalance) run only while this node leads
    scrub: Scrub
    events: EventFeed
    node_removal: NodeRemoval
    node: str  # this node's name
    stale_after: float  # seconds without a report before a node or data server is down
    snapshots: SnapshotService
    clones: CloneService
    backups: BackupService | None = None
    restores: RestoreService | None = None
    schedules: BackupSchedules | None = None
    remotes: RemoteService | None = None
    replication: ReplicationService | None = None
    standbys: StandbyService | None = None
    migrations: MigrationService | None = None
    metrics: Callable[[], Awaitable[bytes]] | None = None  # GET /metrics (adapters/metrics)
    ready: bool = False


#: The dashboard's files (``ui/``), served without a token: they hold no data, and the page
#: asks for the token before it reads anything.
UI_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
            ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def _public(path: str) -> bool:
    return path == "/healthz" or path == "/ui" or path.startswith("/ui/")


def _asset(name: str) -> Response:
    folder = resources.files("cargohold.adapters") / "ui"
    kind = UI_TYPES.get(name[name.rfind("."):]) if "." in name else None
    if kind is None or "/" in name or name.startswith("."):
        return JSONResponse({"error": {"code": "not_found", "message": "no such file"}},
                            status_code=404)
    try:
        body = (folder / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return JSONResponse({"error": {"code": "not_found", "message": "no such file"}},
                            status_code=404)
    return Response(body, media_type=kind, headers={
        "cache-control": "no-cache", "x-content-type-options": "nosniff",
        "content-security-policy": "default-src 'self'; img-src 'self' data:; "
                                   "style-src 'self'; frame-ancestors 'none'"})


def create_app(services: Services, tokens: Sequence[ApiToken] = (),
               audit: AuditLog | None = None) -> FastAPI:
    """The API over ``services``. With ``tokens`` (TCP) every call needs one of them and a
    change needs an admin one; ``audit`` records every change."""
    app = FastAPI(title="cargohold", version=__version__,
                  description="Replicated block volumes for containers.",
                  responses=ERROR_RESPONSES)
    if tokens:
        app.openapi = lambda: _with_bearer(app)  # type: ignore[method-assign]

    @app.exception_handler(CargoholdError)
    async def _error(_request: Request, error: CargoholdError) -> JSONResponse:
        return JSONResponse({"error": error.to_dict()}, status_code=HTTP_STATUS[error.kind])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}"
                            for e in error.errors())
        body = {"code": "invalid_argument", "message": f"Invalid request: {details}"}
        return JSONResponse({"error": body}, status_code=400)

    by_secret = {f"Bearer {t.token}".encode(): t for t in tokens}

    @app.middleware("http")
    async def _auth_and_audit(request: Request, call_next: Any) -> Response:
        """On TCP: a known token, and an admin one for changes. Every change is audited."""
        method, path = request.method, request.url.path
        changes = method not in READ_METHODS
        who, role, peer = "local", "admin", "unix"
        if request.client is not None:  # on a unix socket: "uid=U,pid=P" (port 0)
            peer = (f"{request.client.host}:{request.client.port}" if request.client.port
                    else request.client.host)
        if tokens and not _public(path):
            given = request.headers.get("authorization", "").encode()
            found = next((t for secret, t in by_secret.items()
                          if hmac.compare_digest(given, secret)), None)
            if found is None:
                if changes and audit is not None:
                    audit.record("unknown", peer, method, path, 401)
                return JSONResponse({"error": Unauthorized().to_dict()}, status_code=401)
            who, role = found.name, found.role
            if changes and found.role != "admin":
                if audit is not None:
                    audit.record(who, peer, method, path, 403)
                error = Forbidden(name=who, method=method, path=path)
                return JSONResponse({"error": error.to_dict()}, status_code=403)
        request.state.who, request.state.role = who, role
        response: Response = await call_next(request)
        if changes and audit is not None:
            audit.record(who, peer, method, path, response.status_code)
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {
        "content": {METRICS_TYPE: {}},
        "description": "Prometheus text format: this node's figures, and the cluster's from "
                       "the node that runs the controller"}})
    async def metrics() -> Response:
        body = await services.metrics() if services.metrics is not None else b""
        return Response(body, media_type=METRICS_TYPE)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse({"ready": services.ready, "node": services.node},
                            status_code=200 if services.ready else 503)

    async def servers() -> dict[str, DataServer]:
        return {s.id: s for s in await services.catalog.servers()}

    if services.remotes and services.replication and services.standbys and \
            services.migrations:
        async def view(volume: Volume) -> dict[str, Any]:
            return volume_view(volume, await servers())

        app.include_router(replication_router(services.catalog, services.remotes,
                                              services.replication, services.standbys,
                                              services.migrations, view))

    @app.get("/v1/volumes")
    async def list_volumes(usage: bool = False) -> list[dict[str, Any]]:
        """Every volume; with ``usage``, each with ``used``: the bytes its fullest replica
        takes, measured at most 30 s ago."""
        known = await servers()
        volumes = await services.catalog.volumes()
        views = [volume_view(v, known) for v in volumes]
        if usage:
            used = await services.volumes.recent_use(volumes)
            for view in views:
                view["used"] = used.get(view["name"])
        return views

    @app.get("/v1/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        """The token's name and role (admin or read-only); ``local`` on the unix socket."""
        return {"name": request.state.who, "role": request.state.role,
                "node": services.node}

    @app.get("/ui", include_in_schema=False)
    async def dashboard() -> Response:
        return _asset("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def dashboard_asset(name: str) -> Response:
        return _asset(name)

    @app.post("/v1/volumes", status_code=201)
    async def create_volume(body: CreateVolume) -> dict[str, Any]:
        volume = await services.volumes.create(
            body.name, body.size, body.replicas, body.fs, exist_ok=body.exist_ok,
            encrypt=body.encrypt, key=body.key.encode() if body.key is not None else None,
            locality=body.locality)
        return volume_view(volume, await servers())

    @app.post("/v1/clones", status_code=201)
    async def create_clone(body: CreateClone) -> dict[str, Any]:
        """Create a volume from a snapshot (or a volume's current contents), usable at
        once: while ``origin`` is set it reads what it lacks from there and is filled in the
        background (``filled``: the fraction copied); then it depends on nothing."""
        volume = await services.clones.clone(body.name, body.source, body.size, body.replicas,
                                             body.exist_ok)
        return volume_view(volume, await servers())

    @app.post("/v1/volumes/{name}/revert")
    async def revert_volume(name: str, body: RevertVolume) -> dict[str, Any]:
        """Put a detached volume back to one of its snapshots."""
        return volume_view(await services.clones.revert(name, body.to), await servers())

    @app.get("/v1/volumes/{name}")
    async def inspect_volume(name: str) -> dict[str, Any]:
        volume = await services.catalog.volume(name)
        return volume_view(volume, await servers(), await services.volumes.usage(volume))

    @app.patch("/v1/volumes/{name}")
    async def update_volume(name: str, body: UpdateVolume) -> dict[str, Any]:
        """Change a volume's replica count, attached or not (new replicas fill in the
        background: see its replicas' states), and its locality."""
        if body.replicas is None and body.locality is None:
            raise InvalidArgument(what="body", detail="give replicas or locality")
        volume = None
        if body.locality is not None:
            volume = await services.volumes.set_locality(name, body.locality)
        if body.replicas is not None:
            volume = await services.volumes.set_replicas(name, body.replicas)
        assert volume is not None
        return volume_view(volume, await servers())

    @app.post("/v1/volumes/{name}/move")
    async def move_volume(name: str, body: MoveVolume) -> dict[str, Any]:
        """Prepare a replica on node ``to`` (one elsewhere goes once it is in sync), e.g.
        before the volume's consumer moves there; ``moving`` names the data servers, or is
        null when a replica is there already."""
        moved = await services.controller.locality.move(name, body.to,
                                                        f"moving to node {body.to}")
        view = volume_view(await services.catalog.volume(name), await servers())
        view["moving"] = asdict(moved) if moved is not None else None
        return view

    @app.delete("/v1/volumes/{name}", status_code=204)
    async def remove_volume(name: str) -> Response:
        await services.volumes.remove(name)
        return Response(status_code=204)

    @app.post("/v1/volumes/{name}/attach")
    async def attach_volume(name: str) -> dict[str, Any]:
        return volume_view(await services.agent.attach(name), await servers())

    @app.post("/v1/volumes/{name}/salvage")
    async def salvage_volume(name: str) -> dict[str, Any]:
        """A volume whose every copy failed in turn: the newest copy is in sync again."""
        return await services.volumes.salvage(name)

    @app.post("/v1/volumes/{name}/resize")
    async def resize_volume(name: str, body: ResizeVolume) -> dict[str, Any]:
        """Grow a volume (never shrinks); attached here, online: engine, loop device and
        file system follow. Attached on another node, run it again there to finish."""
        volume = await services.volumes.resize(name, body.size)
        if volume.attachment is not None and volume.attachment.node == services.node:
            volume = await services.agent.expand(name)
        return volume_view(volume, await servers())

    @app.get("/v1/snapshots")
    async def list_snapshots(volume: str = "") -> list[dict[str, Any]]:
        """Ready, failed and deleting snapshots (of ``volume``, or of all), oldest first,
        each with ``unique``: the bytes only it holds (what removing it frees)."""
        found = await services.catalog.snapshots(volume)
        unique = await services.snapshots.usage(found)
        return [snapshot_view(s, unique.get(s.id)) for s in found]

    @app.post("/v1/volumes/{name}/snapshots", status_code=201)
    async def create_snapshot(name: str, body: CreateSnapshot) -> dict[str, Any]:
        """Take a snapshot (crash-consistent, while attached and in use); the same name
        again returns the one taken before."""
        return snapshot_view(await services.snapshots.create(name, body.name, body.freeze))

    @app.post("/v1/snapshot-groups", status_code=201)
    async def create_group_snapshot(body: CreateGroupSnapshot) -> list[dict[str, Any]]:
        """Snapshot several volumes at one instant (one write barrier across their
        engines); idempotent by name."""
        taken = await services.snapshots.create_group(body.name, body.volumes, body.freeze)
        return [snapshot_view(s) for s in taken]

    @app.get("/v1/snapshot-groups/{name}")
    async def inspect_group_snapshot(name: str) -> list[dict[str, Any]]:
        found = [s for s in await services.catalog.snapshots() if s.group == name]
        if not found:
            raise SnapshotNotFound(name=f"group {name}")
        return [snapshot_view(s) for s in found]

    @app.delete("/v1/snapshot-groups/{name}", status_code=204)
    async def remove_group_snapshot(name: str) -> Response:
        if not await services.snapshots.remove_group(name):
            raise SnapshotNotFound(name=f"group {name}")
        return Response(status_code=204)

    @app.get("/v1/volumes/{name}/snapshots/{snapshot}")
    async def inspect_snapshot(name: str, snapshot: str) -> dict[str, Any]:
        found = await services.catalog.snapshot(name, snapshot)
        return snapshot_view(found, (await services.snapshots.usage([found])).get(found.id))

    @app.delete("/v1/volumes/{name}/snapshots/{snapshot}", status_code=204)
    async def remove_snapshot(name: str, snapshot: str) -> Response:
        await services.snapshots.remove(name, snapshot)
        return Response(status_code=204)

    def backups() -> tuple[BackupService, RestoreService]:
        if services.backups is None or services.restores is None:
            raise InvalidArgument(what="backups", detail="not served by this node")
        return services.backups, services.restores

    @app.put("/v1/backup-target")
    async def set_backup_target(body: SetBackupTarget) -> dict[str, Any]:
        """Where backups go (checked: the bucket answers the node's AWS credentials)."""
        return await backups()[0].set_target(
            body.url, body.endpoint, body.region,
            bytes.fromhex(body.key) if body.key is not None else None)

    @app.get("/v1/backup-target")
    async def get_backup_target() -> dict[str, Any]:
        return await backups()[0].target()

    @app.post("/v1/backups", status_code=202)
    async def create_backup(body: CreateBackup) -> dict[str, Any]:
        """Back a volume up from a snapshot (it stays in use); the job runs on (``wait``:
        answered once it ended)."""
        job = await backups()[0].create(body.volume, body.snapshot, body.wait)
        return job.model_dump(mode="json")

    @app.get("/v1/backups")
    async def list_backups(volume: str = "") -> list[dict[str, Any]]:
        """Complete backups in the target, then running and failed ones, oldest first."""
        return await backups()[0].listing(volume)

    @app.get("/v1/backups/{backup_id}")
    async def inspect_backup(backup_id: str) -> dict[str, Any]:
        return await backups()[0].inspect(backup_id)

    @app.delete("/v1/backups/{backup_id}")
    async def remove_backup(backup_id: str) -> dict[str, Any]:
        """Remove a backup, then the blocks no other references (at once, or once no
        backup runs: ``deferred``)."""
        return await backups()[0].remove(backup_id)

    @app.post("/v1/backups/{backup_id}/verify")
    async def verify_backup(backup_id: str, wait: bool = True) -> dict[str, Any]:
        """Fetch every block of the backup and check its hash: a job (``kind`` verify)
        whose ``bad`` names the bad blocks, and why; ``wait=false`` answers at once, and
        ``/v1/backup-jobs/{id}`` shows its progress."""
        job = await backups()[1].verify(backup_id, wait)
        return job.model_dump(mode="json")

    @app.post("/v1/backups/{backup_id}/restore", status_code=202)
    async def restore_backup(backup_id: str, body: RestoreBackup) -> dict[str, Any]:
        """Restore into a new volume (not attachable until done); the job runs on."""
        job = await backups()[1].restore(backup_id, body.to, body.replicas, body.wait,
                                         body.standby)
        return job.model_dump(mode="json")

    @app.post("/v1/volumes/{name}/activate")
    async def activate_volume(name: str) -> dict[str, Any]:
        """Make a standby (a restore that follows a volume's backups) a volume of its own."""
        return volume_view(await backups()[1].activate(name), await servers())

    def schedules() -> BackupSchedules:
        if services.schedules is None:
            raise InvalidArgument(what="backups", detail="not served by this node")
        return services.schedules

    @app.put("/v1/backup-schedules/{volume}")
    async def schedule_backups(volume: str, body: ScheduleBackups) -> dict[str, Any]:
        """Back the volume up every so often (run by the controller), keeping the newest."""
        return await schedules().set(volume, body.every, body.keep)

    @app.get("/v1/backup-schedules")
    async def list_backup_schedules() -> list[dict[str, Any]]:
        return await schedules().listing()

    @app.delete("/v1/backup-schedules/{volume}", status_code=204)
    async def unschedule_backups(volume: str) -> Response:
        if not await schedules().remove(volume):
            raise InvalidArgument(what="volume", detail=f"{volume!r} has no backup schedule")
        return Response(status_code=204)

    @app.get("/v1/backup-jobs/{job_id}")
    async def backup_job(job_id: str) -> dict[str, Any]:
        job = await services.catalog.backup_job(job_id)
        if job is None:
            raise BackupNotFound(id=job_id)
        return job.model_dump(mode="json")

    @app.post("/v1/volumes/{name}/scrub")
    async def scrub_volume(name: str) -> dict[str, Any]:
        return asdict(await services.scrub.scrub_any(name))

    @app.post("/v1/volumes/{name}/detach")
    async def detach_volume(name: str, force: bool = False) -> dict[str, Any]:
        volume = await services.catalog.volume(name)
        if force and volume.attachment is not None and volume.attachment.node != services.node:
            return volume_view(await services.volumes.release(name), await servers())
        return volume_view(await services.agent.detach(name), await servers())

    async def nodes_view(only: str = "") -> list[dict[str, Any]]:
        known = list((await servers()).values())
        alive = await services.catalog.live_nodes()
        draining = await services.catalog.draining()
        leader = await services.controller.leader()
        replicas: dict[str, int] = {}  # replicas per data server
        for volume in await services.catalog.volumes():
            for replica in volume.replicas:
                replicas[replica.server] = replicas.get(replica.server, 0) + 1
        views = []
        for n in await services.catalog.nodes():
            if only and n.name != only:
                continue
            view = node_view(n, known, services.stale_after, n.name in alive)
            view["controller"] = n.name == leader
            view["draining"] = n.name in draining
            view["replicas"] = sum(replicas.get(s["id"], 0) for s in view["data_servers"])
            views.append(view)
        if only and not views:
            raise NodeNotFound(name=only)
        return views

    @app.get("/v1/events")
    async def events() -> StreamingResponse:
        """Every state change from now on, one JSON object per line (see services/events)."""
        async def lines() -> AsyncIterator[bytes]:
            async for event in services.events.stream():
                yield json.dumps(event).encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/v1/rebalance")
    async def rebalance_plan() -> dict[str, Any]:
        rebalance = services.controller.rebalance
        return {"plan": [asdict(m) for m in await rebalance.plan()],
                "pending": await rebalance.pending()}

    @app.post("/v1/rebalance")
    async def rebalance_now() -> dict[str, Any]:
        rebalance = services.controller.rebalance
        started = await rebalance.run_once()
        return {"started": [asdict(m) for m in started], "pending": await rebalance.pending()}

    @app.get("/v1/nodes")
    async def list_nodes() -> list[dict[str, Any]]:
        return await nodes_view()

    @app.get("/v1/nodes/{name}")
    async def inspect_node(name: str) -> dict[str, Any]:
        return (await nodes_view(name))[0]

    @app.post("/v1/nodes/{name}/drain")
    async def drain_node(name: str) -> dict[str, Any]:
        await nodes_view(name)  # NodeNotFound for a node that never joined
        await services.catalog.set_draining(name, True)
        return (await nodes_view(name))[0]

    @app.delete("/v1/nodes/{name}")
    async def remove_node(name: str, force: bool = False) -> dict[str, Any]:
        removed = await services.node_removal.remove(name, force)
        return {"name": removed.name, "removed": True, "data_servers": removed.data_servers,
                "replicas_to_rebuild": removed.replicas_to_rebuild}

    @app.delete("/v1/nodes/{name}/drain")
    async def undrain_node(name: str) -> dict[str, Any]:
        await nodes_view(name)
        await services.catalog.set_draining(name, False)
        return (await nodes_view(name))[0]

    return app
