"""Encryption at rest: the per-block XTS of core/cipher.py against `cryptography`'s XTS,
zeros as stored read as zeros, and volume keys wrapped under the cluster key."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from cargohold.core.cipher import (
    BLOCK,
    VolumeCipher,
    new_key,
    read_key,
    unwrap_key,
    wrap_key,
)
from cargohold.errors import InvalidArgument


def reference(key: bytes, block: int, data: bytes, decrypt: bool = False) -> bytes:
    """XTS with ``cryptography``, one 4 KiB data unit at a time, tweak = block number."""
    out = b""
    for i in range(0, len(data), BLOCK):
        cipher = Cipher(algorithms.AES(key), modes.XTS((block + i // BLOCK).to_bytes(16,
                                                                                   "little")))
        worker = cipher.decryptor() if decrypt else cipher.encryptor()
        out += worker.update(data[i:i + BLOCK]) + worker.finalize()
    return out


def test_the_compiled_cipher_was_built() -> None:
    assert VolumeCipher(new_key()).compiled  # pip install -e . builds core/_xts.c


@pytest.mark.parametrize("compiled", [True, False], ids=["C", "ctypes"])
@settings(max_examples=40, deadline=None)
@given(block=st.integers(0, 2**40), count=st.integers(1, 40), seed=st.binary(min_size=8,
                                                                             max_size=8))
def test_blocks_are_xts_with_their_number_as_tweak(compiled: bool, block: int, count: int,
                                                   seed: bytes) -> None:
    key = new_key()
    data = (seed * (BLOCK // 8 + 1))[:BLOCK] * count
    data = bytes(b ^ (i % 251) for i, b in enumerate(data))  # every block different
    cipher = VolumeCipher(key, compiled)
    sealed = bytes(cipher.encrypt(block, data))
    assert sealed == reference(key, block, data)
    assert bytes(cipher.decrypt(block, sealed)) == data
    # the same bytes at another block are another ciphertext; in place works too
    assert bytes(cipher.encrypt(block + 1, data)) != sealed or count == 0
    buffer = bytearray(data)
    cipher.encrypt(block, buffer, buffer)
    assert bytes(buffer) == sealed
    assert reference(key, block, sealed, decrypt=True) == data


@pytest.mark.parametrize("compiled", [True, False], ids=["C", "ctypes"])
def test_blocks_stored_as_zeros_read_as_zeros(compiled: bool) -> None:
    cipher = VolumeCipher(new_key(), compiled)
    sealed = bytearray(cipher.encrypt(10, os.urandom(3 * BLOCK)))  # type: ignore[arg-type]
    sealed[BLOCK:2 * BLOCK] = bytes(BLOCK)  # a trimmed block in the middle
    plain = cipher.decrypt(10, sealed)
    assert plain[BLOCK:2 * BLOCK] == bytes(BLOCK)
    assert plain[:BLOCK] != bytes(BLOCK)


def test_bad_keys_and_partial_blocks_are_refused() -> None:
    for bad in (b"short", b"\1" * 64, b"z" * 128):
        with pytest.raises(InvalidArgument):
            read_key(bad)
    key = new_key()
    assert read_key(key.hex().encode() + b"\n") == key
    assert read_key(key) == key
    for compiled in (True, False):
        with pytest.raises(InvalidArgument, match="whole 4 KiB blocks"):
            VolumeCipher(key, compiled).encrypt(0, b"x" * 100)


def test_volume_keys_are_stored_wrapped_under_the_cluster_key() -> None:
    cluster, volume_id, key = os.urandom(32), os.urandom(16).hex(), new_key()
    wrapped = wrap_key(cluster, volume_id, key)
    assert key.hex() not in wrapped and unwrap_key(cluster, volume_id, wrapped) == key
    with pytest.raises(InvalidArgument):
        unwrap_key(os.urandom(32), volume_id, wrapped)  # another cluster
    with pytest.raises(InvalidArgument):
        unwrap_key(cluster, os.urandom(16).hex(), wrapped)  # moved to another volume
