"""The engine's cutter: a freeze that takes too long fails the cut and is thawed later."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from cargohold.errors import SnapshotFailed
from cargohold.services.engine import cutter
from cargohold.services.engine.cutter import Cutter


def test_a_freeze_that_hangs_fails_the_cut_and_is_thawed_once_it_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    thawed = threading.Event()
    monkeypatch.setattr(cutter, "FREEZE_TIMEOUT", 0.2)
    monkeypatch.setattr(cutter.kernel, "freeze", lambda path: release.wait(10))
    monkeypatch.setattr(cutter.kernel, "thaw", lambda path: thawed.set())

    async def body() -> None:
        subject = Cutter(None, "vol", 1, "n1", None)  # type: ignore[arg-type]
        with pytest.raises(SnapshotFailed, match="did not freeze within 0.2 s"):
            await subject._freeze("/mnt/x")
        assert not thawed.is_set()  # still freezing: nothing to thaw yet
        release.set()  # the freeze ends after all: it must not stay frozen
        for _ in range(100):
            if thawed.is_set():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the late freeze was not thawed")

    asyncio.run(body())


def test_a_quick_freeze_is_no_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen: list[Any] = []
    monkeypatch.setattr(cutter.kernel, "freeze", frozen.append)

    async def body() -> None:
        await Cutter(None, "vol", 1, "n1", None)._freeze("/mnt/y")  # type: ignore[arg-type]

    asyncio.run(body())
    assert frozen == ["/mnt/y"]
