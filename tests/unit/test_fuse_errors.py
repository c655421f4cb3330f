"""The FUSE session's answers to failed I/O: the errno the kernel gets, and a log that a
fenced engine (every I/O failing the same way) does not flood."""

from __future__ import annotations

import errno
import logging

import pytest

from cargohold.errors import Fenced, NoSpace
from cargohold.services.engine import fuse


class Target:
    size = 16 << 20


def test_the_same_failure_is_logged_once_with_a_count(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    session = fuse.FuseSession(Target(), "/nowhere")  # type: ignore[arg-type]
    answered: list[int] = []
    monkeypatch.setattr(session, "_error", lambda unique, code: answered.append(code))
    now = [1000.0]
    monkeypatch.setattr(fuse.time, "monotonic", lambda: now[0])
    fenced = Fenced(volume_id="v", epoch=3, current=4)
    with caplog.at_level(logging.ERROR, logger=fuse.__name__):
        for unique in range(500):
            session._fail(unique, fenced)
        assert len(caplog.records) == 1  # one line, not 500
        now[0] += fuse.QUIET_FOR + 1
        session._fail(500, fenced)
        session._fail(501, NoSpace(server="s", detail="full"))
    assert answered == [errno.EIO] * 501 + [errno.ENOSPC]  # every request still answered
    messages = [r.getMessage() for r in caplog.records]
    assert messages[1] == "... and 499 more I/O failures like it"
    assert len(messages) == 4 and "full" in messages[3]
