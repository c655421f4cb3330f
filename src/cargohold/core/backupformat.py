"""The backup format: how blocks, manifests and summaries are encoded in the object store.

docs/backup-format.md is the reference (a reader can be written from it); this module is
its one implementation. Everything is pure computation: the I/O is the caller's.

A volume is backed up in blocks of ``BLOCK`` bytes (1 MiB, the replicas' chunk: what changed
since the last backup is known per chunk). A block is stored once per target, under a name
derived from its contents, so equal blocks of any volume of the target are stored once:

* unencrypted target: the name is the BLAKE3 hash of the block (64 hex digits);
* encrypted target: the name is BLAKE3 keyed with the target's *name key*, so the store
  learns nothing from names, and the body is sealed with AES-256-GCM under its *data key*
  (both derived from the key file with HKDF-SHA256), the name as associated data.

A block that changed in few of its 4 KiB pieces since the previous backup is stored as a
*delta*: those pieces and the name of the block they apply to (``encode_delta``).

Every object (block, delta, manifest, summary) is an *envelope*::

    magic (4 bytes) | flags u8 | [nonce 12 bytes, if encrypted] | body

``flags`` bit 0: the body is zstd-compressed (before sealing); bit 1: it is sealed. A
block whose compressed form is not smaller is stored raw. Manifests and summaries are JSON.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cargohold.core.layout import CHUNK_SIZE
from cargohold.core.wire import BytesLike
from cargohold.errors import BackupCorrupt, InvalidArgument

FORMAT = 1
BLOCK = CHUNK_SIZE
BLOCK_MAGIC = b"CHB1"
MANIFEST_MAGIC = b"CHM1"
SUMMARY_MAGIC = b"CHS1"
TARGET_MAGIC = b"CHT1"
DELTA_MAGIC = b"CHD1"
#: A delta stores the 4 KiB pieces of a block that differ from its base block.
PIECE = 4096
#: Deltas on deltas at most this deep: then the whole block is stored again.
MAX_CHAIN = 8
_NAME = 64
COMPRESSED = 1
SEALED = 2
NONCE = 12
KEY_FILE_MIN = 32  # bytes of randomness a key file must hold at least
LEVEL = 3  # zstd level: ~500 MB/s per core, most of the ratio

#: Object names under the target's prefix.
MARKER = "cargohold-backup"  # the target's own envelope: format and key check


def block_key(name: str) -> str:
    return f"blocks/{name[:2]}/{name}"


def delta_key(name: str, base: str) -> str:
    """A delta's key names its base too: equal blocks stored as deltas on different bases
    (two volumes, two backups at once) never overwrite each other."""
    return f"deltas/{name[:2]}/{name}.{base}"


def manifest_key(backup_id: str) -> str:
    return f"manifests/{backup_id}"


def summary_key(backup_id: str) -> str:
    return f"index/{backup_id}"


@dataclass(frozen=True)
class Keys:
    """The two keys of an encrypted target, from its key file."""

    name: bytes  # keys BLAKE3 for block names
    data: bytes  # AES-256-GCM of every object

    @classmethod
    def from_secret(cls, secret: bytes) -> Keys:
        if len(secret) < KEY_FILE_MIN:
            raise InvalidArgument(what="encryption key file", detail=f"holds {len(secret)} "
                                  f"bytes; it needs at least {KEY_FILE_MIN} random ones (e.g. "
                                  "`head -c 32 /dev/urandom > backup.key`)")
        derived = HKDF(algorithm=hashes.SHA256(), length=64, salt=None,
                       info=b"cargohold backup keys 1").derive(secret)
        return cls(name=derived[:32], data=derived[32:])


class Codec:
    """Encodes and decodes one target's objects (``keys`` None: not encrypted)."""

    def __init__(self, keys: Keys | None) -> None:
        self.keys = keys
        self._aead = AESGCM(keys.data) if keys is not None else None

    @property
    def encrypted(self) -> bool:
        return self.keys is not None

    def name(self, block: BytesLike) -> str:
        """The block's name: its (keyed) BLAKE3 hash."""
        if self.keys is not None:
            return blake3.blake3(block, key=self.keys.name).hexdigest()
        return blake3.blake3(block).hexdigest()

    def seal(self, magic: bytes, body: BytesLike, aad: bytes, compress: bool = True) -> bytes:
        flags = 0
        payload = bytes(body)
        if compress:
            packed = zstandard.ZstdCompressor(level=LEVEL).compress(payload)
            if len(packed) < len(payload):
                payload, flags = packed, COMPRESSED
        if self._aead is None:
            return magic + bytes([flags]) + payload
        nonce = os.urandom(NONCE)
        return (magic + bytes([flags | SEALED]) + nonce
                + self._aead.encrypt(nonce, payload, magic + aad))

    def open(self, magic: bytes, blob: BytesLike, aad: bytes, what: str,
             limit: int = 64 << 20) -> bytes:
        """The body of an envelope; ``BackupCorrupt`` naming ``what`` if it is not one of
        this target's (damaged, another key, another kind of object)."""
        view = memoryview(blob)
        if len(view) < 5 or bytes(view[:4]) != magic:
            raise BackupCorrupt(what=what, detail="not an object of this kind")
        flags = view[4]
        payload: bytes = bytes(view[5:])
        if flags & SEALED:
            if self._aead is None:
                raise BackupCorrupt(what=what, detail="encrypted, and this target has no key")
            if len(payload) < NONCE + 16:
                raise BackupCorrupt(what=what, detail="truncated")
            try:
                payload = self._aead.decrypt(payload[:NONCE], payload[NONCE:], magic + aad)
            except InvalidTag:
                raise BackupCorrupt(what=what, detail="does not open with this key (damaged, "
                                    "or another target's)") from None
        elif self._aead is not None:
            raise BackupCorrupt(what=what, detail="not encrypted, and this target is")
        if flags & COMPRESSED:
            try:
                payload = zstandard.ZstdDecompressor().decompress(payload,
                                                                  max_output_size=limit)
            except zstandard.ZstdError as e:
                raise BackupCorrupt(what=what, detail=f"does not decompress: {e}") from None
        return payload

    def encode_block(self, block: BytesLike) -> tuple[str, bytes]:
        """(name, object) of one block."""
        name = self.name(block)
        return name, self.seal(BLOCK_MAGIC, block, name.encode())

    def decode_block(self, name: str, blob: BytesLike) -> bytes:
        """The block stored as ``name``, its hash checked."""
        data = self.open(BLOCK_MAGIC, blob, name.encode(), f"block {name}", limit=BLOCK)
        if self.name(data) != name:
            raise BackupCorrupt(what=f"block {name}", detail="its contents do not hash to its "
                                "name")
        return data

    def encode_delta(self, name: str, base: str, block: BytesLike,
                     pieces: list[int]) -> bytes:
        """Block ``name`` stored as its ``pieces`` (indexes of 4 KiB pieces) that differ
        from block ``base`` (of the same length): body = base name (64 ASCII hex) |
        count u16 | piece indexes u16 each | those pieces."""
        view = memoryview(block).cast("B")
        body = b"".join([base.encode(), struct.pack(f">H{len(pieces)}H", len(pieces), *pieces),
                         *(view[i * PIECE:(i + 1) * PIECE] for i in pieces)])
        return self.seal(DELTA_MAGIC, body, name.encode())

    def decode_delta(self, name: str, blob: BytesLike) -> tuple[str, dict[int, bytes]]:
        """(base name, pieces by index) of a delta; its result is checked by the caller
        (``apply``: the hash of the whole block)."""
        body = self.open(DELTA_MAGIC, blob, name.encode(), f"block {name}", limit=2 * BLOCK)
        try:
            base = body[:_NAME].decode("ascii")
            (count,) = struct.unpack_from(">H", body, _NAME)
            indexes = struct.unpack_from(f">{count}H", body, _NAME + 2)
            start = _NAME + 2 + 2 * count
            pieces = {i: body[start + k * PIECE:start + (k + 1) * PIECE]
                      for k, i in enumerate(indexes)}
        except (UnicodeDecodeError, struct.error):
            raise BackupCorrupt(what=f"block {name}", detail="a malformed delta") from None
        if len(body) != start + count * PIECE or len(base) != _NAME:
            raise BackupCorrupt(what=f"block {name}", detail="a malformed delta")
        return base, pieces

    def apply(self, name: str, base: bytes, pieces: dict[int, bytes]) -> bytes:
        """Block ``name`` from its base's bytes and its delta's pieces, its hash checked."""
        block = bytearray(base)
        for index, piece in pieces.items():
            if (index + 1) * PIECE > len(block):
                raise BackupCorrupt(what=f"block {name}", detail="a piece past its end")
            block[index * PIECE:(index + 1) * PIECE] = piece
        if self.name(block) != name:
            raise BackupCorrupt(what=f"block {name}", detail="its contents do not hash to "
                                "its name")
        return bytes(block)

    def encode_json(self, magic: bytes, backup_id: str, value: Any) -> bytes:
        return self.seal(magic, json.dumps(value, separators=(",", ":")).encode(),
                         backup_id.encode())

    def decode_json(self, magic: bytes, backup_id: str, blob: BytesLike, what: str) -> Any:
        body = self.open(magic, blob, backup_id.encode(), what)
        try:
            return json.loads(body)
        except ValueError:
            raise BackupCorrupt(what=what, detail="not JSON") from None

    def marker(self) -> bytes:
        """The target's marker: says the format, and (sealed) proves the key."""
        return self.encode_json(TARGET_MAGIC, MARKER, {"format": FORMAT,
                                                       "encrypted": self.encrypted})

    def check_marker(self, blob: BytesLike) -> None:
        found = self.decode_json(TARGET_MAGIC, MARKER, blob, "the target's marker")
        if found.get("format") != FORMAT:
            raise BackupCorrupt(what="the target", detail=f"format {found.get('format')}; "
                                f"this cargohold reads format {FORMAT}")


def manifest(backup_id: str, volume: str, volume_id: str, snapshot: str, created: float,
             size: int, fs: str, blocks: dict[int, str], parent: str,
             volume_key: bytes | None, bases: dict[str, str] | None = None) -> dict[str, Any]:
    """A backup's manifest: everything needed to restore it, alone. ``bases``: for each
    block stored as a delta (among the blocks, and their bases, transitively), its base."""
    needed: dict[str, str] = {}
    for name in set(blocks.values()):
        while bases and name in bases and name not in needed:
            needed[name] = bases[name]
            name = bases[name]
    return {"format": FORMAT, "id": backup_id, "volume": volume, "volume_id": volume_id,
            "snapshot": snapshot, "created": created, "size": size, "fs": fs,
            "block_size": BLOCK, "parent": parent,
            "volume_key": volume_key.hex() if volume_key is not None else None,
            "blocks": [[index, blocks[index]] for index in sorted(blocks)],
            "bases": dict(sorted(needed.items()))}


def bases_of(found: dict[str, Any], what: str) -> dict[str, str]:
    """A manifest's deltas and their bases, checked (no cycle, chains at most MAX_CHAIN)."""
    raw = found.get("bases", {})
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) == len(v) == _NAME
            for k, v in raw.items()):
        raise BackupCorrupt(what=what, detail="its delta bases are malformed")
    for name in raw:
        depth, at = 0, name
        while at in raw:
            at, depth = raw[at], depth + 1
            if depth > MAX_CHAIN:
                raise BackupCorrupt(what=what, detail=f"block {name}'s deltas go deeper "
                                    f"than {MAX_CHAIN} (or round in a circle)")
    return dict(raw)


def depth(name: str, bases: dict[str, str]) -> int:
    """How many deltas lie between block ``name`` and a whole block."""
    count = 0
    while name in bases and count <= MAX_CHAIN:  # (a circle counts as too deep)
        name, count = bases[name], count + 1
    return count


def blocks_of(found: dict[str, Any], what: str) -> dict[int, str]:
    """A manifest's blocks by index, checked."""
    if found.get("format") != FORMAT or found.get("block_size") != BLOCK:
        raise BackupCorrupt(what=what, detail=f"format {found.get('format')}, blocks of "
                            f"{found.get('block_size')} bytes: not one this cargohold reads")
    try:
        blocks = {int(i): str(n) for i, n in found["blocks"]}
    except (KeyError, TypeError, ValueError):
        raise BackupCorrupt(what=what, detail="its block list is malformed") from None
    size = int(found.get("size", 0))
    if any(i < 0 or i * BLOCK >= size or len(n) != 64 for i, n in blocks.items()):
        raise BackupCorrupt(what=what, detail="a block lies outside the volume or is misnamed")
    return blocks
