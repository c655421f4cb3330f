"""Validation of user-chosen names (volumes, snapshots, nodes)."""

from __future__ import annotations

import re

from cargohold.errors import InvalidName

MAX_NAME = 63
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # the whole name (fullmatch)


def check_name(name: object) -> str:
    """Return ``name`` if it can name a volume; raise ``InvalidName`` otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidName(name=name, detail="it is empty")
    if len(name) > MAX_NAME:
        raise InvalidName(name=name, detail=f"it is longer than {MAX_NAME} characters")
    if not _NAME_RE.fullmatch(name):
        raise InvalidName(name=name, detail="it contains characters that are not allowed")
    return name


def split_snapshot(ref: object) -> tuple[str, str]:
    """``VOLUME@SNAPSHOT`` as (volume, snapshot), both checked; ``InvalidName`` otherwise."""
    if not isinstance(ref, str) or ref.count("@") != 1:
        raise InvalidName(name=ref, detail="a snapshot is named VOLUME@SNAPSHOT")
    volume, _, snapshot = ref.partition("@")
    return check_name(volume), check_name(snapshot)
