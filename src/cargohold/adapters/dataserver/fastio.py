"""Plain writes and cached reads served without Python: the data server's compiled path.

``_fastio.c`` takes a run of WRITE, WRITE_SHARED and small READ frames from the front of
what a connection received and serves each through its replica's compiled ``BlockIO``
(stores/_blockio.c), as long as the connection's Python path served that volume's I/O at
that epoch before (``allow``) and nothing about the frame needs more than a plain write or a
read of blocks the page cache holds with matching checksums; the first frame that does, and
everything after it, goes the Python way. The Python path (``_Connection._handle``) is the
reference; ``make`` gives None when the C was not built or ``CARGOHOLD_COMPILED=0``, and the
connection then serves every frame in Python.
"""

from __future__ import annotations

from typing import Any

from cargohold.core import compiled
from cargohold.core.wire import MAGIC, MAX_PAYLOAD, VERSION, Op, Status

try:
    from cargohold.adapters.dataserver._fastio import (  # type: ignore[import-not-found]
        FastIO,
    )
except ImportError:  # pragma: no cover - the build is optional
    FastIO = None


def built() -> bool:
    return FastIO is not None


def make(read_max: int) -> Any:
    """A connection's ``FastIO``, or None (see the module); it serves reads of at most
    ``read_max`` bytes (larger ones go to the disk reader's threads in Python)."""
    if FastIO is None or not compiled.wanted():
        return None
    return FastIO(magic=MAGIC, version=VERSION, write_op=Op.WRITE, shared_op=Op.WRITE_SHARED,
                  read_op=Op.READ, ok=Status.OK, max_payload=MAX_PAYLOAD, read_max=read_max)
