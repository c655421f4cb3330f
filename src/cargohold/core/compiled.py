"""Whether the compiled parts of the data path are used (where they were built).

Each C extension has its Python reference and fallback beside it: ``core/_frames.c`` for
``core/wire.py``'s header decoders, ``stores/_diskreads.c`` for ``stores/diskreads.py``,
``stores/_blockio.c`` for ``stores/blockio.py``, ``adapters/dataserver/_fastio.c`` for
the data server's plain writes and cached reads (the Python request path is its reference),
``services/engine/_fusering.c`` (FUSE over io_uring) for reading /dev/fuse.
``CARGOHOLD_COMPILED=0`` in the environment runs the Python ones, to compare the two or to
rule the C out; the test suite runs both.
"""

from __future__ import annotations

import os

VARIABLE = "CARGOHOLD_COMPILED"


def wanted() -> bool:
    """Unless the environment says ``CARGOHOLD_COMPILED=0``."""
    return os.environ.get(VARIABLE, "1") != "0"
