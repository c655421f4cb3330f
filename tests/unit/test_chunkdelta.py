"""The body of a chunk's changed blocks: what is encoded decodes to the same runs, and a
body that does not match its bitmap is refused before anything is written."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cargohold.core import chunkdelta
from cargohold.core.layout import BLOCK_SIZE
from cargohold.errors import InvalidArgument


@given(st.sets(st.integers(0, chunkdelta.BLOCKS - 1), min_size=1, max_size=40))
def test_encoded_blocks_decode_as_their_runs(chosen: set[int]) -> None:
    blocks = sorted(chosen)
    data = os.urandom(len(blocks) * BLOCK_SIZE)
    decoded = list(chunkdelta.decode(chunkdelta.encode(blocks, data)))
    found = []
    for at, piece in decoded:
        assert at % BLOCK_SIZE == 0 and len(piece) % BLOCK_SIZE == 0
        found += [(at // BLOCK_SIZE + k, bytes(piece[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]))
                  for k in range(len(piece) // BLOCK_SIZE)]
    assert found == [(b, data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
                     for i, b in enumerate(blocks)]
    assert len(decoded) == sum(1 for i, b in enumerate(blocks)
                               if i == 0 or blocks[i - 1] != b - 1)


def test_bodies_that_do_not_match_their_bitmap_are_refused() -> None:
    body = chunkdelta.encode([3, 4], bytes(2 * BLOCK_SIZE))
    with pytest.raises(InvalidArgument, match="blocks"):
        list(chunkdelta.decode(body[:-1]))
    with pytest.raises(InvalidArgument, match="blocks"):
        list(chunkdelta.decode(body + bytes(BLOCK_SIZE)))
    with pytest.raises(InvalidArgument, match="blocks"):
        list(chunkdelta.decode(bytes(chunkdelta.BITMAP)))  # no block at all
    with pytest.raises(InvalidArgument, match="bitmap"):
        list(chunkdelta.decode(b"\x01"))
    with pytest.raises(ValueError):
        chunkdelta.encode([1], b"short")


def test_a_batch_keeps_its_records_and_refuses_a_bad_one_whole() -> None:
    records = [(7, chunkdelta.HOLE, b""), (8, chunkdelta.WHOLE, b"w" * 100),
               (9, chunkdelta.DELTA, chunkdelta.encode([1], bytes(BLOCK_SIZE)))]
    body = chunkdelta.encode_batch(records)
    assert [(c, k, bytes(p)) for c, k, p in chunkdelta.decode_batch(body)] == records
    with pytest.raises(InvalidArgument, match="cut short"):
        chunkdelta.decode_batch(body + b"\x01")
    with pytest.raises(InvalidArgument, match="chunk 9"):
        chunkdelta.decode_batch(body[:-1])  # the last record's payload is short
    with pytest.raises(InvalidArgument, match="chunk 3"):
        chunkdelta.decode_batch(chunkdelta.encode_batch([(3, chunkdelta.HOLE, b"x")]))
    with pytest.raises(InvalidArgument, match="no record"):
        chunkdelta.decode_batch(b"")
