"""The data servers' heap settings are best effort and never fail."""

from __future__ import annotations

from cargohold.daemons import heap


def test_keep_large_buffers_is_harmless() -> None:
    assert heap.keep_large_buffers() in (True, False)
    buffers = [bytearray(1 << 20) for _ in range(4)]  # the heap still serves large buffers
    assert all(len(b) == 1 << 20 for b in buffers)
