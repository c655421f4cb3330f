"""Op.SHARE's checks: which client's write buffers a data server maps, and how.

Only over the unix socket, and only a file the connecting process holds open itself
(``/proc/PID/fd/N`` with the peer's PID from the socket's credentials): never a path the
client merely names. The file must be sealed against shrinking, so that no page of the
mapping can go away under the server (a SIGBUS would kill it): ``map_sealed`` checks that.
"""

from __future__ import annotations

import mmap
import re
import socket
import struct

from cargohold.clients.sharedmemory import map_sealed
from cargohold.core.wire import TOKEN_SIZE, BytesLike, decode_json
from cargohold.errors import InvalidArgument


def map_offered(sock: socket.socket | None, payload: BytesLike) -> tuple[mmap.mmap, str]:
    """Map, read-only, the buffers a SHARE request on ``sock`` offers; with the sharer's
    name (``PID:client id``; "" when the request names no client)."""
    if sock is None or sock.family != socket.AF_UNIX:
        raise InvalidArgument(what="SHARE", detail="only over the data server's unix socket")
    pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              struct.calcsize("3i")))[0]
    request = decode_json(payload)
    path, token = (request.get("path"), request.get("token")) if isinstance(
        request, dict) else (None, None)
    if not isinstance(path, str) or not isinstance(token, str):
        raise InvalidArgument(what="SHARE", detail="needs a path and a token")
    try:
        expected = bytes.fromhex(token)
    except ValueError:
        expected = b""
    if len(expected) < TOKEN_SIZE:
        raise InvalidArgument(what="SHARE",
                              detail=f"the token must be {TOKEN_SIZE} bytes or more")
    if re.fullmatch(rf"/proc/{pid}/fd/\d+", path) is None:
        raise InvalidArgument(what="SHARE", detail=f"{path} is not a file of the connecting "
                              f"process (/proc/{pid}/fd/N)")
    shared = map_sealed(path, expected)
    client = request.get("client")
    return shared, f"{pid}:{client}" if isinstance(client, str) and client else ""
