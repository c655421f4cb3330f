"""What a process shows data servers to be let in: its TLS context and its capabilities."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from cargohold.core.capability import Capability


@dataclass(frozen=True)
class Access:
    """``tls``: the client context for TCP connections (None: plaintext, which a node only
    uses when its operator said so). A node holds the cluster key and signs capabilities for
    itself (``key``); an engine holds only the one of its attachment (``granted``)."""

    tls: ssl.SSLContext | None
    node: str = ""
    key: bytes = field(default=b"", repr=False)
    granted: dict[tuple[str, int], bytes] = field(default_factory=dict, repr=False)

    def capability(self, volume_id: str, epoch: int) -> bytes | None:
        """The AUTHORIZE payload for I/O on ``volume_id`` at ``epoch``, if this process has
        one."""
        found = self.granted.get((volume_id, epoch))
        if found is None and self.key:
            found = Capability(volume_id, epoch, self.node).sign(self.key)
        return found
