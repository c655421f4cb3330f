"""The Docker volume plugin (legacy v1 protocol), served by the node on a unix socket.

Docker discovers it at ``/run/docker/plugins/cargohold.sock``. ``Mount``/``Unmount`` carry a
random ID per mount and one volume can be mounted by several containers of a host at once:
the first Mount attaches, the last Unmount detaches. Those references are kept in a file, so
a restarted node (plugin) still knows which containers use which volume. Create may arrive
twice at the same moment (from two Swarm nodes) and must succeed both times.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cargohold.core.cipher import read_key
from cargohold.core.sizes import parse_size
from cargohold.errors import CargoholdError, InvalidArgument, InvalidOption, VolumeExists
from cargohold.services.agent import Agent
from cargohold.services.clones import CloneService
from cargohold.services.volumes import VolumeService
from cargohold.stores.auditlog import AuditLog
from cargohold.stores.catalog import Catalog

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
OPTIONS = {"size": "1G", "replicas": "2", "fs": "ext4", "encrypt": "false", "key-file": "",
           "locality": "best-effort",
           "from": ""}  # from: VOLUME@SNAPSHOT or VOLUME, a clone
_TRUTH = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class MountRefs:
    """Which Docker mount IDs hold each volume on this host, kept in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._refs: dict[str, list[str]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._refs = {}

    def holders(self, name: str) -> list[str]:
        return list(self._refs.get(name, []))

    def names(self) -> list[str]:
        return list(self._refs)

    def set(self, name: str, ids: list[str]) -> None:
        if ids:
            self._refs[name] = ids
        else:
            self._refs.pop(name, None)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._refs))
        os.replace(tmp, self.path)


class DockerPlugin:
    def __init__(self, catalog: Catalog, volumes: VolumeService, agent: Agent,
                 refs_file: Path, clones: CloneService | None = None) -> None:
        self.catalog = catalog
        self.volumes = volumes
        self.clones = clones
        self.agent = agent
        self.refs = MountRefs(refs_file)
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def forget_detached(self) -> None:
        """Drop the mount references of volumes not attached on this node (at start): the
        node that stopped detached them (SIGTERM; a managed plugin disabled with -f), and
        Docker sends no Unmount for containers removed meanwhile, so they would block
        ``docker volume rm`` for ever."""
        for name in self.refs.names():
            volume = await self.catalog.find_volume(name)
            attachment = volume.attachment if volume is not None else None
            if attachment is None or attachment.node != self.agent.node:
                log.info("volume %s is not attached here: its %d Docker mount(s) are gone",
                         name, len(self.refs.holders(name)))
                self.refs.set(name, [])

    async def activate(self, _body: dict[str, Any]) -> dict[str, Any]:
        return {"Implements": ["VolumeDriver"]}

    async def capabilities(self, _body: dict[str, Any]) -> dict[str, Any]:
        return {"Capabilities": {"Scope": "global"}}

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        name = _name(body)
        given = body.get("Opts") or {}
        if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
            raise InvalidArgument(what="Opts", detail="give options as -o KEY=VALUE")
        unknown = sorted(set(given) - set(OPTIONS))
        if unknown:
            raise InvalidOption(option=unknown[0], known=", ".join(sorted(OPTIONS)))
        opts = {**OPTIONS, **given}
        existing = await self.catalog.find_volume(name)
        if existing is not None and not given:
            return {"Err": ""}  # `docker run -v NAME:/x` of an existing volume
        encrypt = _TRUTH.get(opts["encrypt"].lower())
        if encrypt is None:
            raise InvalidArgument(what="encrypt", detail="true or false")
        key = _key(opts["key-file"]) if opts["key-file"] else None
        if given.get("from"):
            return await self._clone(name, given)
        try:
            await self.volumes.create(name, opts["size"], opts["replicas"], opts["fs"],
                                      exist_ok=True, encrypt=encrypt, key=key,
                                      locality=opts["locality"])
        except VolumeExists:
            if existing is not None:
                size = parse_size(opts["size"])
                raise InvalidArgument(
                    what="options", detail=f"volume {name!r} exists with size "
                    f"{existing.size}, {existing.replica_count} replicas and {existing.fs}; "
                    f"asked for {size}, {opts['replicas']} and {opts['fs']}") from None
            raise
        return {"Err": ""}

    async def _clone(self, name: str, given: dict[str, str]) -> dict[str, Any]:
        """``-o from=VOLUME@SNAPSHOT`` (or ``from=VOLUME``): size (at least the source's)
        and replicas may be given; the clone keeps the source's file system and key."""
        if self.clones is None:
            raise InvalidArgument(what="from", detail="clones are not served here")
        other = sorted(set(given) - {"from", "size", "replicas"})
        if other:
            raise InvalidArgument(what="options", detail=f"{', '.join(other)} cannot be given "
                                  "with from: a clone takes them from its source")
        await self.clones.clone(name, given["from"], given.get("size"), given.get("replicas"),
                                exist_ok=True)
        return {"Err": ""}

    async def remove(self, body: dict[str, Any]) -> dict[str, Any]:
        name = _name(body)
        if self.refs.holders(name):
            raise InvalidArgument(what="remove", detail=f"volume {name!r} is mounted by "
                                  f"{len(self.refs.holders(name))} container(s) on this host")
        await self.volumes.remove(name)
        return {"Err": ""}

    async def mount(self, body: dict[str, Any]) -> dict[str, Any]:
        name, mount_id = _name(body), str(body.get("ID", ""))
        log.info("docker Mount %s (mount %s)", name, mount_id[:12])
        async with self._lock(name):
            holders = self.refs.holders(name)
            volume = await self.agent.attach(name)  # same mount when already attached here
            if mount_id not in holders:
                self.refs.set(name, [*holders, mount_id])
        assert volume.attachment is not None
        return {"Mountpoint": volume.attachment.mountpoint, "Err": ""}

    async def unmount(self, body: dict[str, Any]) -> dict[str, Any]:
        name, mount_id = _name(body), str(body.get("ID", ""))
        log.info("docker Unmount %s (mount %s)", name, mount_id[:12])
        async with self._lock(name):
            holders = [h for h in self.refs.holders(name) if h != mount_id]
            if not holders:
                await self.agent.detach(name)
            self.refs.set(name, holders)
        return {"Err": ""}

    async def path(self, body: dict[str, Any]) -> dict[str, Any]:
        volume = await self.catalog.volume(_name(body))
        return {"Mountpoint": self._mountpoint(volume.attachment), "Err": ""}

    async def get(self, body: dict[str, Any]) -> dict[str, Any]:
        volume = await self.catalog.volume(_name(body))
        status = {"size": volume.size, "replicas": volume.replica_count,
                  "in_sync": len(volume.in_sync()), "fs": volume.fs,
                  "state": volume.state.value, "id": volume.id,
                  "node": volume.attachment.node if volume.attachment else ""}
        return {"Volume": {"Name": volume.name, "Mountpoint": self._mountpoint(volume.attachment),
                           "Status": status}, "Err": ""}

    async def list(self, _body: dict[str, Any]) -> dict[str, Any]:
        return {"Volumes": [{"Name": v.name, "Mountpoint": self._mountpoint(v.attachment)}
                            for v in await self.catalog.volumes()], "Err": ""}

    def _mountpoint(self, attachment: Any) -> str:
        if attachment is None or attachment.node != self.agent.node:
            return ""
        return str(attachment.mountpoint)


def _name(body: dict[str, Any]) -> str:
    name = body.get("Name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(what="request", detail="Name is missing")
    return name


#: Plugin calls that change something: each is written to the audit log.
CHANGES = frozenset({"/VolumeDriver.Create", "/VolumeDriver.Remove", "/VolumeDriver.Mount",
                     "/VolumeDriver.Unmount"})


def _key(path: str) -> bytes:
    """A volume key from a file on this host (``-o key-file=PATH``)."""
    try:
        with open(path, "rb") as f:
            return read_key(f.read(1024))
    except OSError as e:
        raise InvalidArgument(what="key-file", detail=f"{path}: {e.strerror or e}") from None


def create_app(plugin: DockerPlugin, audit: AuditLog | None = None) -> Starlette:
    handlers = {
        "/Plugin.Activate": plugin.activate,
        "/VolumeDriver.Capabilities": plugin.capabilities,
        "/VolumeDriver.Create": plugin.create,
        "/VolumeDriver.Remove": plugin.remove,
        "/VolumeDriver.Mount": plugin.mount,
        "/VolumeDriver.Unmount": plugin.unmount,
        "/VolumeDriver.Path": plugin.path,
        "/VolumeDriver.Get": plugin.get,
        "/VolumeDriver.List": plugin.list,
    }

    def endpoint(path: str) -> Any:
        handler = handlers[path]

        async def serve(request: Request) -> JSONResponse:
            raw = await request.body()
            body: Any = {}
            try:
                body = json.loads(raw) if raw.strip() else {}
                result = await handler(body if isinstance(body, dict) else {})
            except CargoholdError as e:  # Docker shows Err to the user as it is
                log.info("%s refused: %s", path, e.message)
                result = {"Err": f"{e.message} [{e.code}]"}
            except ValueError as e:
                result = {"Err": f"malformed request: {e}"}
            if audit is not None and path in CHANGES:
                name = body.get("Name") if isinstance(body, dict) else None
                audit.record("docker", "unix", "POST", path, 200, volume=str(name),
                             error=result.get("Err", ""))
            return JSONResponse(result, media_type=CONTENT_TYPE)

        return serve

    return Starlette(routes=[Route(p, endpoint(p), methods=["POST"]) for p in handlers])
