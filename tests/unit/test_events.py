"""The event stream over the in-memory store: each state change becomes one event."""

from __future__ import annotations

import asyncio
from typing import Any

from cargohold.core.models import (
    Attachment,
    DataServer,
    Replica,
    ReplicaState,
    ServerState,
    Volume,
    VolumeState,
    liveness_key,
)
from cargohold.services.events import EventFeed
from cargohold.stores.catalog import Catalog
from cargohold.stores.metadata import MemoryStore


def test_state_changes_become_events() -> None:
    async def body() -> list[dict[str, Any]]:
        store = MemoryStore()
        catalog = Catalog(store)
        await catalog.put_server(DataServer(id="s1", node="a", address="x:1", path="/d"))
        feed = EventFeed(store).stream()
        assert (await anext(feed))["kind"] == "stream"
        first = asyncio.ensure_future(anext(feed))
        await asyncio.sleep(0.05)  # the feed is watching now
        await catalog.add_volume(Volume(id="0" * 32, name="v", size=1 << 30, replica_count=2,
                                        fs="ext4", replicas=[Replica(server="s1"),
                                                             Replica(server="s2")]))

        def attach(v: Volume) -> Volume:
            v.state, v.epoch = VolumeState.ATTACHED, 3
            v.attachment = Attachment(node="a", epoch=3)
            return v

        def lose(v: Volume) -> Volume:
            v.replicas[1].state, v.replicas[1].reason = ReplicaState.OUT_OF_SYNC, "gone"
            return v

        await catalog.update_volume("v", attach)
        await catalog.update_volume("v", lose)
        await catalog.put_server(DataServer(id="s1", node="a", address="x:1", path="/d",
                                            state=ServerState.DOWN))
        lease = await store.grant_lease(5)
        await store.put(liveness_key("b"), b"", lease=lease)
        await store.revoke_lease(lease)
        await catalog.remove_volume("v")
        events = [await first]
        for _ in range(6):
            events.append(await asyncio.wait_for(anext(feed), 2))
        await feed.aclose()
        return events

    events = asyncio.run(body())
    assert [(e["kind"], e["name"], e["event"]) for e in events] == [
        ("volume", "v", "created"),
        ("volume", "v", "attached"),
        ("replica", "v", "out_of_sync"),
        ("server", "s1", "down"),
        ("node", "b", "up"),
        ("node", "b", "down"),
        ("volume", "v", "removed"),
    ]
    assert events[1]["message"] == "volume v is attached on node a (epoch 3)"
    assert events[2]["message"] == "replica of v on s2 is out of sync (gone)"
    assert [e["revision"] for e in events] == sorted(e["revision"] for e in events)


def test_snapshot_changes_become_events() -> None:
    from cargohold.core.models import Snapshot, SnapshotState, snapshot_key
    from cargohold.services.events import describe

    cutting = Snapshot(id="1" * 32, name="s", volume="v", volume_id="0" * 32, size=1)
    ready = cutting.model_copy(update={"state": SnapshotState.READY, "held": 0.0421})
    failed = cutting.model_copy(update={"state": SnapshotState.FAILED, "error": "boom"})
    deleting = ready.model_copy(update={"state": SnapshotState.DELETING})
    key = snapshot_key("v", "s")
    assert describe(key, None, cutting.dump()) == []  # asked, not taken yet
    [taken] = describe(key, cutting.dump(), ready.dump())
    assert (taken["kind"], taken["name"], taken["event"]) == ("snapshot", "v@s", "taken")
    assert taken["message"] == "snapshot v@s taken; writes held 42 ms"
    [bad] = describe(key, cutting.dump(), failed.dump())
    assert bad["event"] == "failed" and "boom" in bad["message"]
    assert describe(key, ready.dump(), deleting.dump()) == []
    [gone] = describe(key, deleting.dump(), None)
    assert gone["event"] == "removed"
    assert describe(key, failed.dump(), None) == []  # a failed cut: said when it failed


def test_a_clone_filled_is_an_event() -> None:
    from cargohold.core.models import Origin, volume_key
    from cargohold.services.events import describe

    origin = Origin(volume="src", volume_id="0" * 32, snapshot="s", snapshot_id="1" * 32,
                    size=1 << 20)
    filling = Volume(id="2" * 32, name="c", size=1 << 20, replica_count=2, fs="ext4",
                     source="src@s", origin=origin, filled=0.5)
    filled = filling.model_copy(update={"origin": None, "filled": 1.0})
    assert describe(volume_key("c"), filling.dump(), filling.dump()) == []
    [event] = describe(volume_key("c"), filling.dump(), filled.dump())
    assert (event["kind"], event["name"], event["event"]) == ("volume", "c", "filled")
    assert event["message"] == "clone c is filled: it no longer depends on src@s"


def test_a_backup_ended_is_an_event() -> None:
    from cargohold.core.models import BackupState, LastBackup, volume_key
    from cargohold.services.events import describe

    running = Volume(id="2" * 32, name="pg", size=1 << 20, replica_count=2, fs="ext4",
                     last_backup=LastBackup(id="b1", state=BackupState.RUNNING, started=1.0))
    done = running.model_copy(update={"last_backup": LastBackup(
        id="b1", state=BackupState.COMPLETE, started=1.0, finished=2.0, bytes=10,
        new_bytes=4)})
    failed = running.model_copy(update={"last_backup": LastBackup(
        id="b2", state=BackupState.FAILED, started=3.0, error="the target did not answer")})
    assert describe(volume_key("pg"), None, running.dump())[1:] == []  # created only
    [event] = describe(volume_key("pg"), running.dump(), done.dump())
    assert (event["kind"], event["event"]) == ("backup", "complete")
    assert event["message"] == "backup b1 of pg complete: 10 bytes, 4 new"
    assert describe(volume_key("pg"), done.dump(), done.dump()) == []
    [bad] = describe(volume_key("pg"), done.dump(), failed.dump())
    assert bad["event"] == "failed" and "did not answer" in bad["message"]
