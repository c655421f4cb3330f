"""The REST API between clusters: remotes, replication of a volume, promotion, and the
receiving side of a copy (``/v1/standbys/...``, what another cluster's controller calls)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from cargohold import __version__
from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.models import Volume
from cargohold.errors import InvalidArgument
from cargohold.services.migrations import MigrationService
from cargohold.services.remotes import RemoteService
from cargohold.services.replication import ReplicationService
from cargohold.services.standbys import StandbyService
from cargohold.stores.catalog import Catalog

#: The largest batch taken: a sender makes them of a few MiB.
BATCH_MAX = 16 * CHUNK_SIZE
BATCH_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary",
               "description": "records of a chunk index (u32), a kind (u8: 0 a hole, 1 the "
                              "whole chunk, 2 its changed blocks), a length (u32) and that "
                              "many bytes, little-endian"}}}}}


class AddRemote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    endpoint: str = Field(json_schema_extra={
        "description": "https://HOST:PORT of one of the remote cluster's nodes"})
    token: str = Field(json_schema_extra={"description": "an admin token of its API"})
    ca: str = Field(default="", json_schema_extra={
        "description": "PEM of the CA its certificate is checked with (default: the "
                       "system's)"})


class Replicate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(json_schema_extra={"description": "the remote cluster's name here"})
    every: str | float = Field(default="60s", json_schema_extra={
        "description": "seconds between rounds, or a number with s, m, h or d (at least "
                       "10 s)"})


class Migrate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(json_schema_extra={"description": "the remote cluster's name here"})
    wait: bool = Field(default=False, json_schema_extra={
        "description": "answer once it is done or failed"})
    hold: bool = Field(default=False, json_schema_extra={
        "description": "once the copies in use are done, keep copying (state ready) until "
                       "POST .../migrate/go, then hand over (a companion pauses the consumer "
                       "first)"})


class SourceVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cluster: str
    volume: str
    volume_id: str


class BeginCopy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: SourceVolume
    point: str = Field(pattern=r"^[0-9a-f]{8,32}$")
    base: str = Field(default="", pattern=r"^([0-9a-f]{8,32})?$")
    size: int = Field(gt=0)
    fs: str
    replicas: int = Field(ge=1, le=5)
    created: float
    key: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")


def router(catalog: Catalog, remotes: RemoteService, replication: ReplicationService,
           standbys: StandbyService, migrations: MigrationService,
           view: Callable[[Volume], Awaitable[dict[str, Any]]]) -> APIRouter:
    """The routes, over the services; ``view`` shows a volume as the rest of the API does."""
    api = APIRouter()

    @api.get("/v1/cluster")
    async def cluster() -> dict[str, str]:
        """This cluster's id (what a remote that adds it learns)."""
        return {"id": await catalog.cluster_id(), "version": __version__}

    @api.get("/v1/remotes")
    async def list_remotes() -> list[dict[str, Any]]:
        return await remotes.listing()

    @api.post("/v1/remotes", status_code=201)
    async def add_remote(body: AddRemote) -> dict[str, Any]:
        """Add another cluster, checked first: its API answers with that CA and token."""
        return await remotes.add(body.name, body.endpoint, body.token, body.ca)

    @api.delete("/v1/remotes/{name}", status_code=204)
    async def remove_remote(name: str) -> Response:
        await remotes.remove(name)
        return Response(status_code=204)

    @api.put("/v1/volumes/{name}/replication")
    async def replicate(name: str, body: Replicate) -> dict[str, Any]:
        """Copy the volume to another cluster every so often (the controller does)."""
        return await view(await replication.start(name, body.to, body.every))

    @api.post("/v1/volumes/{name}/replication/now")
    async def replicate_now(name: str) -> dict[str, Any]:
        """Start a round at the controller's next turn."""
        return await view(await replication.now(name))

    @api.delete("/v1/volumes/{name}/replication")
    async def stop_replicating(name: str) -> dict[str, Any]:
        return await view(await replication.stop(name))

    @api.post("/v1/volumes/{name}/migrate")
    async def migrate(name: str, body: Migrate) -> dict[str, Any]:
        """Move the volume to another cluster while in use: copies of what changed, then
        a short hold of its writes, and the remote copy is the primary (this one fenced).
        Follow it in the volume's ``migration``."""
        return await view(await migrations.migrate(name, body.to, body.wait, body.hold))

    @api.post("/v1/volumes/{name}/migrate/go")
    async def migrate_go(name: str) -> dict[str, Any]:
        """Let a migration started with ``hold`` (state ``ready``) go on to its handover."""
        return await view(await migrations.go(name))

    @api.post("/v1/volumes/{name}/promote")
    async def promote(name: str) -> dict[str, Any]:
        """Make a standby of another cluster's volume writable (its source is fenced out),
        or a fenced former source writable again."""
        return await view(await standbys.promote(name))

    @api.post("/v1/standbys/{name}/sessions", status_code=201)
    async def begin_copy(name: str, body: BeginCopy) -> dict[str, Any]:
        """Start receiving a point of another cluster's volume into standby ``name``."""
        return await standbys.begin(name, body.source.model_dump(), body.point, body.base,
                                    body.size, body.fs, body.replicas, body.created,
                                    bytes.fromhex(body.key) if body.key else None)

    @api.put("/v1/standbys/{name}/sessions/{session}/batch", openapi_extra=BATCH_BODY)
    async def put_batch(name: str, session: str, request: Request) -> dict[str, int]:
        """Several chunks' changes in one request: holes, whole chunks, changed blocks."""
        if int(request.headers.get("content-length") or 0) > BATCH_MAX:
            raise InvalidArgument(what="batch", detail=f"more than {BATCH_MAX} bytes")
        return {"chunks": await standbys.write_batch(name, session, await request.body())}

    @api.post("/v1/standbys/{name}/sessions/{session}/commit")
    async def commit_copy(name: str, session: str) -> dict[str, Any]:
        """Every chunk is in: the standby holds the point from now on."""
        return await standbys.commit(name, session)

    @api.delete("/v1/standbys/{name}/sessions/{session}", status_code=204)
    async def abort_copy(name: str, session: str) -> Response:
        await standbys.abort(name, session)
        return Response(status_code=204)

    return api
