"""``container migrate``: move a Docker container with its cargohold volumes to a host of
another cluster.

The volumes are migrated live (``volume migrate`` with ``hold``): copies go on while the
container runs, until each is ready to hand over. Then every volume's handover starts at
once: its file system is frozen and its engine holds the writes (the container's writers
wait there: that is the pause), the last changes go over and the remote copies are
promoted; the source is fenced, so what the container still does there is refused. The
same container (image, command, environment, mounts, host configuration) is created and
started on the target host's dockerd, whose plugin attaches the promoted volumes, and the
one here is removed. Nothing is stopped before every volume is ready, and a handover that
fails before the fence lets the writes go: the container goes on where it was. The
downtime reported is from the handover's start to the start there.

Not ``docker pause`` first: a process frozen by the cgroup freezer in the middle of a write
keeps the file system from freezing (FIFREEZE waits for it), which was seen here as a
handover that never froze. A checkpoint of the process (CRIU) would keep its memory too;
this machine's kernel cannot, so the container restarts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from cargohold.cli.output import migration_text
from cargohold.clients.docker import DockerClient
from cargohold.errors import InvalidArgument, VolumeBusy

if TYPE_CHECKING:
    from cargohold.clients.api import ApiClient

#: How long the copies in use may take before every volume is ready.
READY_TIMEOUT = 3600.0


def container_command(api: ApiClient, args: argparse.Namespace, as_json: bool) -> int:
    with DockerClient(args.docker) as source, DockerClient(args.target_docker) as target:
        moved = _migrate(api, source, target, args.container, args.to, args.driver)
    if as_json:
        print(json.dumps(moved, indent=2))
    else:
        for name, volume in moved["volumes"].items():
            print(f"{name}: {migration_text(volume)}")
        print(f"container {moved['container']} runs on {args.target_docker} now; down "
              f"{moved['downtime']:.2f} s (writes held {moved['held'] * 1000:.0f} ms)")
    return 0


def _migrate(api: ApiClient, source: DockerClient, target: DockerClient, container: str,
             remote: str, driver: str) -> dict[str, Any]:
    info = source.inspect(container)
    name = str(info["Name"]).lstrip("/")
    if not info["State"].get("Running") or info["State"].get("Paused"):
        raise InvalidArgument(what="container", detail=f"{name} is not running")
    volumes = [m["Name"] for m in info.get("Mounts") or []
               if m.get("Type") == "volume" and str(m.get("Driver", "")).split(":")[0] == driver]
    if not volumes:
        raise InvalidArgument(what="container", detail=f"{name} uses no {driver} volume")
    image = str(info["Config"]["Image"])
    if not target.has_image(image):
        raise InvalidArgument(what="target host", detail=f"it has no image {image!r}: load "
                              "it there first")
    try:
        target.inspect(name)
    except InvalidArgument:
        pass
    else:
        raise InvalidArgument(what="target host", detail=f"a container named {name} is "
                              "there already")
    for volume in volumes:
        api.request("POST", f"/v1/volumes/{volume}/migrate", {"to": remote, "hold": True})
    _until_all(api, volumes, {"ready"}, "copying while it runs")
    paused = time.monotonic()
    for volume in volumes:
        api.request("POST", f"/v1/volumes/{volume}/migrate/go")
    states = _until_all(api, volumes, {"done"}, "handing over")
    handed = time.monotonic()
    config = {**info["Config"], "HostConfig": info["HostConfig"]}
    if config.get("Hostname") == str(info["Id"])[:12]:
        config.pop("Hostname")  # the default (its id): the new one gets its own
    target.create(name, config)
    target.start(name)
    downtime = time.monotonic() - paused
    source.remove(name, force=True)  # fenced: nothing it did since was kept
    return {"container": name, "downtime": round(downtime, 3),
            "handover": round(handed - paused, 3),
            "held": max(s["held"] for s in states.values()), "volumes": states}


def _until_all(api: ApiClient, volumes: list[str], wanted: set[str],
               what: str) -> dict[str, dict[str, Any]]:
    """Wait until every volume's migration is in a ``wanted`` state; a failed one raises."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        states = {v: api.request("GET", f"/v1/volumes/{v}")["migration"] for v in volumes}
        failed = {v: s for v, s in states.items() if s["state"] == "failed"}
        if failed:
            raise VolumeBusy(name=", ".join(failed), state="not migrated: " + "; ".join(
                f"{v}: {s['error']}" for v, s in failed.items()))
        if all(s["state"] in wanted for s in states.values()):
            print(f"\r{what}: {len(volumes)} volume(s) {'/'.join(wanted)}{' ' * 20}",
                  file=sys.stderr)
            return states
        if time.monotonic() > deadline:
            raise VolumeBusy(name=", ".join(volumes), state=f"not {'/'.join(wanted)} within "
                             f"{READY_TIMEOUT:g} s")
        rounds = sum(len(s["rounds"]) for s in states.values())
        print(f"\r{what}: {rounds} round(s) of copies made", end="", file=sys.stderr,
              flush=True)
        time.sleep(0.05)

