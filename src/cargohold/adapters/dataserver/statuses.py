"""Errors as the data server's wire statuses: the one place where they become what a client
reads (docs/protocol.md), logged and counted as faults on the way."""

from __future__ import annotations

import logging

from cargohold.core.faults import Faults
from cargohold.core.sizes import format_size
from cargohold.core.wire import (
    Op,
    RequestHeader,
    Status,
    encode_json,
    encode_text,
    encode_u64,
)
from cargohold.errors import (
    CargoholdError,
    ChecksumMismatch,
    Fenced,
    InvalidArgument,
    NoSpace,
    NotAuthorized,
    ReplicaNotFound,
    SnapshotNotFound,
    TooManySnapshots,
)
from cargohold.stores.chunkstore import ChunkStore

log = logging.getLogger("cargohold.adapters.dataserver")

def error_response(exc: BaseException, header: RequestHeader,
                    store: ChunkStore, faults: Faults) -> tuple[Status, bytes]:
    """The one place where errors become wire statuses (and are counted in ``faults``)."""
    if isinstance(exc, Fenced):
        return Status.FENCED, encode_u64(int(exc.fields["current"]))
    if isinstance(exc, ChecksumMismatch):
        log.warning("%s", exc)
        faults.found(header.volume_id, int(exc.fields["offset"]))
        return Status.CHECKSUM, encode_u64(int(exc.fields["offset"]))
    if isinstance(exc, ReplicaNotFound):
        return Status.NOT_FOUND, encode_text(str(exc))
    if isinstance(exc, NoSpace):
        text = f"{exc.fields.get('detail', exc)} ({space(store)})"
        log.warning("%s on volume %s: %s", op_name(header.op), header.volume_id, text)
        return Status.NO_SPACE, encode_text(text)
    if isinstance(exc, SnapshotNotFound | TooManySnapshots):
        return Status.REFUSED, encode_json(exc.to_dict())
    if isinstance(exc, NotAuthorized):
        log.warning("refused %s on volume %s: %s", op_name(header.op), header.volume_id, exc)
        return Status.FORBIDDEN, encode_text(f"{exc.fields.get('what')}: "
                                             f"{exc.fields.get('detail')}")
    if isinstance(exc, InvalidArgument):
        what, detail = exc.fields.get("what"), exc.fields.get("detail")
        text = f"{what}: {detail}" if what is not None and detail is not None else str(exc)
        return Status.INVALID, encode_text(text)
    faults.io_errors += 1
    if isinstance(exc, CargoholdError | OSError):
        log.error("%s on volume %s failed: %s", op_name(header.op), header.volume_id, exc)
    else:
        log.error("%s on volume %s failed", op_name(header.op), header.volume_id, exc_info=exc)
    return Status.IO_ERROR, encode_text(str(exc) or type(exc).__name__)


def space(store: ChunkStore) -> str:
    """How full the store is, for a NO_SPACE answer (the caller shows it to the user)."""
    try:
        free, capacity, used = store.free(), store.capacity(), store.used()
    except OSError as exc:
        return f"free space unknown: {exc}"
    return (f"{format_size(free)} free of {format_size(capacity)}; replicas use "
            f"{format_size(used)} of {format_size(store.provisioned())} provisioned. Free space "
            f"(delete data in its volumes and run fstrim) or move replicas off it")


def op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"op {op}"
