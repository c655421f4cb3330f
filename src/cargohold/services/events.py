"""The event stream: every state change in the cluster, as it happens.

Built from the metadata store's watch, so every node serves the same stream whichever node
made the change: a volume created, attached (node, epoch), detached, removed, a clone
filled, a backup of it complete or failed; a replica out
of sync, resyncing, back in sync, added by a rebuild, dropped; a snapshot taken (with how
long writers waited), failed, removed; a data server up or down; a node's lease taken or
lost; the controller moving; a drain started or stopped.

Each event is a dict: ``time`` (seconds), ``revision`` (the store's), ``kind`` (volume,
replica, snapshot, backup, server, node, controller), ``name``, ``event`` (a short verb such as
``attached``) and ``message`` (a sentence).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from cargohold.core.models import (
    DRAIN_PREFIX,
    LIVENESS_PREFIX,
    SNAPSHOT_PREFIX,
    DataServer,
    ReplicaState,
    Snapshot,
    SnapshotState,
    Volume,
)
from cargohold.stores.metadata import MetadataStore

Event = dict[str, Any]

PREFIXES = ("volumes/", "dataservers/", LIVENESS_PREFIX, "controller/", DRAIN_PREFIX,
            SNAPSHOT_PREFIX)


class EventFeed:
    def __init__(self, store: MetadataStore) -> None:
        self.store = store

    async def stream(self) -> AsyncIterator[Event]:
        """Events from now on, in store order, until the caller stops iterating. The first
        one (kind ``stream``) says from which store revision on."""
        revision = await self.store.revision()
        known = {kv.key: kv.value for kv in await self.store.range("") if _watched(kv.key)}
        yield {"time": round(time.time(), 3), "revision": revision,
               **_event("stream", "", "started", f"following changes after revision {revision}")}
        # one watch over every key keeps the store's order across kinds of record
        async for change in self.store.watch("", revision):
            key = change.kv.key
            if not _watched(key):
                continue
            old = known.pop(key, None)
            new = change.kv.value if change.type == "put" else None
            if new is not None:
                known[key] = new
            for event in describe(key, old, new):
                yield {"time": round(time.time(), 3), "revision": change.revision, **event}


def _watched(key: str) -> bool:
    return key.startswith(PREFIXES)


def _event(kind: str, name: str, event: str, message: str, **extra: Any) -> Event:
    return {"kind": kind, "name": name, "event": event, "message": message, **extra}


def describe(key: str, old: bytes | None, new: bytes | None) -> list[Event]:
    """The events one change of ``key`` from ``old`` to ``new`` (None: absent) stands for."""
    if key.startswith("volumes/"):
        return _volume(Volume.model_validate_json(old) if old else None,
                       Volume.model_validate_json(new) if new else None)
    if key.startswith(SNAPSHOT_PREFIX):
        return _snapshot(Snapshot.model_validate_json(old) if old else None,
                         Snapshot.model_validate_json(new) if new else None)
    if key.startswith("dataservers/"):
        return _server(DataServer.model_validate_json(old) if old else None,
                       DataServer.model_validate_json(new) if new else None)
    if key.startswith(LIVENESS_PREFIX):
        node = key[len(LIVENESS_PREFIX):]
        if new is not None and old is None:
            return [_event("node", node, "up", f"node {node} is up (its lease is alive)")]
        if new is None:
            return [_event("node", node, "down", f"node {node} is down (its lease ended)")]
        return []
    if key.startswith("controller/"):
        if new is not None and new != old:
            leader = new.decode()
            return [_event("controller", leader, "elected", f"node {leader} is the controller")]
        if new is None and old is not None:
            return [_event("controller", old.decode(), "lost",
                           f"node {old.decode()} is no longer the controller")]
        return []
    if key.startswith(DRAIN_PREFIX):
        node = key[len(DRAIN_PREFIX):]
        if new is not None and old is None:
            return [_event("node", node, "draining", f"node {node} is being drained")]
        if new is None and old is not None:
            return [_event("node", node, "drain stopped", f"node {node} is no longer drained")]
    return []


def _volume(old: Volume | None, new: Volume | None) -> list[Event]:
    if new is None:
        return [] if old is None else [_event("volume", old.name, "removed",
                                              f"volume {old.name} removed")]
    name = new.name
    events = []
    if old is None:
        events.append(_event("volume", name, "created", f"volume {name} created "
                             f"({new.size} bytes, {new.replica_count} replicas, {new.fs})"))
    elif old.state != new.state:
        where = (f" on node {new.attachment.node} (epoch {new.attachment.epoch})"
                 if new.attachment else "")
        events.append(_event("volume", name, new.state.value,
                             f"volume {name} is {new.state.value}{where}",
                             state=new.state.value))
    if old is not None and old.origin is not None and new.origin is None:
        events.append(_event("volume", name, "filled", f"clone {name} is filled: it no "
                             f"longer depends on {old.origin.ref}"))
    done, earlier = new.last_backup, old.last_backup if old is not None else None
    if done is not None and done.state.value != "running" and (
            earlier is None or (earlier.id, earlier.state) != (done.id, done.state)):
        what = (f"complete: {done.bytes} bytes, {done.new_bytes} new" if not done.error
                else f"failed: {done.error}")
        events.append(_event("backup", name, done.state.value,
                             f"backup {done.id} of {name} {what}", backup=done.id))
    if old is not None and old.size != new.size:
        events.append(_event("volume", name, "resized",
                             f"volume {name} grew from {old.size} to {new.size} bytes"))
    before = {r.server: r for r in old.replicas} if old else {}
    after = {r.server: r for r in new.replicas}
    for server, replica in after.items():
        was = before.get(server)
        if was is None:
            if old is not None:
                why = f": {replica.reason}" if replica.reason else ""
                events.append(_event("replica", name, "added", f"volume {name} has a new "
                                     f"replica on {server}{why}", server=server,
                                     state=replica.state.value))
        elif was.state != replica.state:
            why = f" ({replica.reason})" if replica.reason else ""
            text = {ReplicaState.IN_SYNC: "is in sync again",
                    ReplicaState.OUT_OF_SYNC: f"is out of sync{why}",
                    ReplicaState.RESYNCING: "is resyncing"}[replica.state]
            events.append(_event("replica", name, replica.state.value,
                                 f"replica of {name} on {server} {text}", server=server,
                                 state=replica.state.value))
    for server in before.keys() - after.keys():
        events.append(_event("replica", name, "dropped",
                             f"replica of {name} on {server} dropped", server=server))
    return events


def _server(old: DataServer | None, new: DataServer | None) -> list[Event]:
    if new is None:
        return [] if old is None else [_event("server", old.id, "removed",
                                              f"data server {old.id} removed")]
    if old is None:
        return [_event("server", new.id, "joined", f"data server {new.id} of node "
                       f"{new.node} joined ({new.path})", node=new.node)]
    if old.state != new.state:
        return [_event("server", new.id, new.state.value, f"data server {new.id} of node "
                       f"{new.node} is {new.state.value}", node=new.node)]
    return []


def _snapshot(old: Snapshot | None, new: Snapshot | None) -> list[Event]:
    if new is None:
        if old is None or old.state is not SnapshotState.DELETING:
            return []  # a cut given up or failed: said when it failed
        return [_event("snapshot", old.ref, "removed", f"snapshot {old.ref} removed")]
    if old is not None and old.state is new.state:
        return []
    if new.state is SnapshotState.READY:
        group = f" (group {new.group})" if new.group else ""
        return [_event("snapshot", new.ref, "taken", f"snapshot {new.ref} taken{group}; "
                       f"writes held {new.held * 1000:.0f} ms", held=new.held)]
    if new.state is SnapshotState.FAILED:
        return [_event("snapshot", new.ref, "failed",
                       f"snapshot {new.ref} failed: {new.error}")]
    return []
