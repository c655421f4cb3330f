"""The engine's shared write buffers: slots, holds, the token at the file's end."""

from __future__ import annotations

import os

import pytest

from cargohold.clients.sharedmemory import TOKEN_SIZE, SharedMemory
from cargohold.services.engine.fuse import READ_BUFFER, FuseSession


def test_a_slot_is_free_again_only_when_its_last_holder_lets_go() -> None:
    shared = SharedMemory(8192, slots=2)
    try:
        first, second = shared.take(), shared.take()
        assert {first, second} == {0, 1} and shared.take() is None
        assert first is not None
        assert shared.hold(first * 8192 + 100) == first  # a client names a byte in it
        shared.release(first)
        assert shared.free == 0  # the client still holds it
        shared.release(first)
        assert shared.free == 1 and shared.take() == first
        shared.slot(first)[:5] = b"hello"
        with open(shared.path, "rb") as other:  # what a data server maps on this host
            assert other.read(5) == b"hello"
            other.seek(-TOKEN_SIZE, os.SEEK_END)
            assert other.read() == shared.token
    finally:
        shared.close()
    assert shared.fd == -1


def test_a_fuse_session_refuses_slots_smaller_than_a_request() -> None:
    shared = SharedMemory(4096, slots=1)
    try:
        with pytest.raises(ValueError, match="cannot hold a request"):
            FuseSession(None, "/nowhere", shared)  # type: ignore[arg-type]
        assert shared.free == 1  # nothing taken
    finally:
        shared.close()
    big = SharedMemory(READ_BUFFER, slots=2)
    try:
        session = FuseSession(None, "/nowhere", big)  # type: ignore[arg-type]
        assert big.free == 1 and session._slot >= 0  # it reads into a slot
    finally:
        big.close()
