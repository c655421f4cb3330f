"""The backup format's encoding (docs/backup-format.md): names, envelopes, manifests."""

from __future__ import annotations

import os

import blake3
import pytest

from cargohold.core import backupformat as fmt
from cargohold.errors import BackupCorrupt, InvalidArgument

SECRET = bytes(range(32))


def test_plain_blocks_are_named_by_their_hash_and_compressed_when_it_pays() -> None:
    codec = fmt.Codec(None)
    text = b"cargohold " * 100_000 + b"x" * (fmt.BLOCK - 1_000_000)
    name, blob = codec.encode_block(text)
    assert name == blake3.blake3(text).hexdigest()
    assert blob[:4] == b"CHB1" and blob[4] == fmt.COMPRESSED and len(blob) < len(text) // 50
    assert codec.decode_block(name, blob) == text
    noise = os.urandom(fmt.BLOCK)
    noise_name, stored = codec.encode_block(noise)
    assert stored[4] == 0 and stored[5:] == noise  # incompressible: stored raw
    assert fmt.block_key(noise_name) == f"blocks/{noise_name[:2]}/{noise_name}"


def test_encrypted_blocks_have_keyed_names_and_sealed_bodies() -> None:
    codec = fmt.Codec(fmt.Keys.from_secret(SECRET))
    data = b"secret rows " * 1000
    name, blob = codec.encode_block(data)
    assert name != blake3.blake3(data).hexdigest()  # the store cannot tell what it holds
    assert name == codec.encode_block(data)[0]  # the same block: the same name (dedup)
    assert blob[4] == fmt.COMPRESSED | fmt.SEALED and b"secret rows" not in blob
    assert codec.decode_block(name, blob) == data
    other = fmt.Codec(fmt.Keys.from_secret(bytes(reversed(range(32)))))
    with pytest.raises(BackupCorrupt, match="does not open with this key"):
        other.decode_block(name, blob)
    with pytest.raises(BackupCorrupt, match="has no key"):
        fmt.Codec(None).decode_block(name, blob)
    with pytest.raises(BackupCorrupt, match="not encrypted"):
        codec.decode_block(*fmt.Codec(None).encode_block(data))


@pytest.mark.parametrize("keys", [None, fmt.Keys.from_secret(SECRET)])
def test_damage_and_misplaced_objects_are_named(keys: fmt.Keys | None) -> None:
    codec = fmt.Codec(keys)
    data = os.urandom(4096) * 4
    name, blob = codec.encode_block(data)
    flipped = bytearray(blob)
    flipped[-3] ^= 1
    with pytest.raises(BackupCorrupt, match=name):
        codec.decode_block(name, bytes(flipped))
    other, _ = codec.encode_block(b"other" * 100)
    with pytest.raises(BackupCorrupt):
        codec.decode_block(other, blob)  # a block stored under another block's name
    with pytest.raises(BackupCorrupt, match="not an object of this kind"):
        codec.decode_json(fmt.MANIFEST_MAGIC, "b1", blob, "manifest")


def test_manifests_are_complete_and_checked() -> None:
    codec = fmt.Codec(fmt.Keys.from_secret(SECRET))
    blocks = {0: "a" * 64, 5: "b" * 64}
    found = fmt.manifest("b1", "pg", "0" * 32, "nightly", 1.0, 8 << 20, "ext4", blocks, "",
                         b"k" * 64)
    blob = codec.encode_json(fmt.MANIFEST_MAGIC, "b1", found)
    back = codec.decode_json(fmt.MANIFEST_MAGIC, "b1", blob, "manifest")
    assert fmt.blocks_of(back, "b1") == blocks and back["volume_key"] == (b"k" * 64).hex()
    with pytest.raises(BackupCorrupt):  # sealed for b1: not b2's
        codec.decode_json(fmt.MANIFEST_MAGIC, "b2", blob, "manifest")
    with pytest.raises(BackupCorrupt, match="outside"):
        fmt.blocks_of({**back, "size": 4 << 20}, "b1")
    with pytest.raises(BackupCorrupt, match="format"):
        fmt.blocks_of({**back, "format": 99}, "b1")


def test_a_key_file_must_hold_enough_randomness() -> None:
    with pytest.raises(InvalidArgument, match="at least 32"):
        fmt.Keys.from_secret(b"short")
    marker = fmt.Codec(fmt.Keys.from_secret(SECRET)).marker()
    fmt.Codec(fmt.Keys.from_secret(SECRET)).check_marker(marker)
    with pytest.raises(BackupCorrupt):
        fmt.Codec(fmt.Keys.from_secret(b"\x01" * 32)).check_marker(marker)


@pytest.mark.parametrize("keys", [None, fmt.Keys.from_secret(SECRET)])
def test_a_block_stored_as_the_pieces_that_differ_from_its_base(keys: fmt.Keys | None) -> None:
    codec = fmt.Codec(keys)
    base = os.urandom(fmt.BLOCK)
    new = bytearray(base)
    new[8192:12288] = os.urandom(4096)
    new[-4096:] = bytes(4096)
    base_name, name = codec.name(base), codec.name(bytes(new))
    blob = codec.encode_delta(name, base_name, new, [2, 255])
    assert len(blob) < 3 * 4096 + 200  # two pieces and a header
    found_base, pieces = codec.decode_delta(name, blob)
    assert found_base == base_name and sorted(pieces) == [2, 255]
    assert codec.apply(name, base, pieces) == bytes(new)
    with pytest.raises(BackupCorrupt, match="do not hash"):
        codec.apply(name, os.urandom(fmt.BLOCK), pieces)  # another base
    if keys is not None:  # sealed for its own name (unsealed: ``apply`` checks the hash)
        with pytest.raises(BackupCorrupt):
            codec.decode_delta(base_name, blob)
    assert fmt.delta_key(name, base_name) == f"deltas/{name[:2]}/{name}.{base_name}"


def test_manifests_carry_the_bases_of_their_deltas_and_chains_are_bounded() -> None:
    a, b, c, d = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    found = fmt.manifest("b1", "pg", "0" * 32, "s", 1.0, 4 << 20, "ext4", {0: c, 1: d}, "",
                         None, {c: b, b: a, "e" * 64: a})
    assert found["bases"] == {b: a, c: b}  # what its blocks need, transitively
    assert fmt.bases_of(found, "b1") == {b: a, c: b} and fmt.depth(c, found["bases"]) == 2
    deep = {f"{i:064x}": f"{i + 1:064x}" for i in range(fmt.MAX_CHAIN + 1)}
    with pytest.raises(BackupCorrupt, match="deeper"):
        fmt.bases_of({"bases": deep}, "b2")
    with pytest.raises(BackupCorrupt, match="deeper"):
        fmt.bases_of({"bases": {a: b, b: a}}, "b3")  # a circle
    with pytest.raises(BackupCorrupt, match="malformed"):
        fmt.bases_of({"bases": {a: "short"}}, "b4")
