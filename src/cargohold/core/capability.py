"""Capabilities: the cluster's permission for one attachment to do I/O on a volume's replicas.

A capability names a volume, an epoch and the node that may use it, and carries an
HMAC-SHA256 of the three under the cluster key (which only nodes hold). A data server takes
I/O (and FENCE) for a volume on a connection only at the epoch of a capability presented on
it (Op.AUTHORIZE), and only from the node it names: so no client can choose an epoch, and a
capability seen on the wire is no use from another host. The encoding (the AUTHORIZE
payload; the volume and epoch travel in the frame header) is::

    u16 length of the node name | node name (utf-8) | 32 bytes of HMAC

and the HMAC covers ``DOMAIN | volume id (16 bytes) | epoch (u64) | u16 length | node``,
all integers big-endian. A capability at epoch 0 (``SNAPSHOT_READS``) lets its holder read
the volume's snapshots and nothing else: no write or head read takes epoch 0.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import NamedTuple

from cargohold.errors import NotAuthorized

DOMAIN = b"cargohold capability 1\0"
#: The epoch of a capability that allows reading the volume's snapshots only (READ_SNAPSHOT
#: at epoch 0: snapshots never change, so the reader need not hold the volume's epoch, and
#: fences nobody). A clone's engine holds one for its source while the clone fills.
SNAPSHOT_READS = 0
MAC_SIZE = 32
MAX_NODE = 255  # bytes of a node name


class Capability(NamedTuple):
    volume_id: str  # 32 hex characters
    epoch: int
    node: str

    def _mac(self, key: bytes, node: bytes) -> bytes:
        message = (DOMAIN + bytes.fromhex(self.volume_id) + struct.pack("!QH", self.epoch,
                                                                        len(node)) + node)
        return hmac.new(key, message, hashlib.sha256).digest()

    def sign(self, key: bytes) -> bytes:
        """The AUTHORIZE payload presenting this capability."""
        node = self.node.encode()
        if not node or len(node) > MAX_NODE:
            raise NotAuthorized(what="capability", detail=f"node name {self.node!r}")
        return struct.pack("!H", len(node)) + node + self._mac(key, node)

    @classmethod
    def verify(cls, key: bytes, volume_id: str, epoch: int,
               payload: bytes | memoryview) -> Capability:
        """The capability in ``payload`` for ``volume_id`` at ``epoch``, if the cluster key
        signed it; else ``NotAuthorized``."""
        if len(payload) < 2 + MAC_SIZE:
            raise NotAuthorized(what="capability", detail="too short")
        (size,) = struct.unpack_from("!H", payload)
        if size == 0 or len(payload) != 2 + size + MAC_SIZE:
            raise NotAuthorized(what="capability", detail="malformed")
        node = bytes(payload[2:2 + size])
        try:
            capability = cls(volume_id, epoch, node.decode())
            expected = capability._mac(key, node)
        except (UnicodeDecodeError, ValueError, struct.error):
            raise NotAuthorized(what="capability", detail="malformed") from None
        if not hmac.compare_digest(expected, bytes(payload[2 + size:])):
            raise NotAuthorized(what="capability", detail=f"not signed by this cluster's key "
                                f"for volume {volume_id} at epoch {epoch}")
        return capability
