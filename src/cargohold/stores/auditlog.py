"""The audit log: one JSON line per call that changes the cluster, in the node's state
directory (``audit.log``), readable by root only.

Each line says who (the API token's name; ``local`` on the unix socket, whose file mode
limits it to root and its group; ``docker`` for the Docker plugin), from where, what
(method and path) and the result (HTTP status).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, who: str, peer: str, method: str, path: str, status: int,
               **extra: Any) -> None:
        line = json.dumps({"time": round(time.time(), 3), "who": who, "peer": peer,
                           "method": method, "path": path, "status": status, **extra})
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode() + b"\n")  # one write: lines never interleave
            finally:
                os.close(fd)
        except OSError as e:  # the call itself is done; say it loudly, do not fail it
            log.error("cannot write the audit log %s: %s (%s)", self.path, e, line)
