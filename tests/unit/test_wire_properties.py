"""Properties of the data protocol's frame reader (hypothesis): whatever the chunking, valid
frames come out exactly as they went in; whatever the bytes, the reader either returns frames
or refuses the stream with InvalidArgument, never anything else."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cargohold.core import wire
from cargohold.errors import InvalidArgument

U64 = st.integers(min_value=0, max_value=2**64 - 1)
U32 = st.integers(min_value=0, max_value=2**32 - 1)
frames = st.lists(st.tuples(  # op, request id, volume, epoch, offset, length, generation
    st.sampled_from(list(wire.Op)), U32, st.sampled_from(["", "ab" * 16, "0f" * 16]),
    U64, U64, U32, U64, st.binary(max_size=200_000)), max_size=8)


def _feed(reader: wire.FrameReader[Any], data: bytes, pieces: list[int]) -> list[Any]:
    """Push ``data`` through ``reader`` in pieces of the given sizes (then the rest);
    return (header, payload bytes) of every frame it gave."""
    out: list[Any] = []
    at = 0
    sizes = iter(pieces)
    while at < len(data):
        buffer = reader.get_buffer()
        n = min(len(buffer), len(data) - at, next(sizes, len(data)) or 1)
        buffer[:n] = data[at:at + n]
        at += n
        out += [(header, bytes(payload)) for header, payload in reader.feed(n)]
    return out


@settings(max_examples=150, deadline=None)
@given(frames, st.lists(st.integers(min_value=1, max_value=70_000), max_size=40))
def test_frames_come_out_as_they_went_in_however_they_are_cut(
        sent: list[Any], pieces: list[int]) -> None:
    stream = b"".join(
        wire.encode_request_header(op, rid, vid, epoch=epoch, offset=offset, length=length,
                                   generation=gen, payload_length=len(payload)) + payload
        for op, rid, vid, epoch, offset, length, gen, payload in sent)
    got = _feed(wire.request_reader(reuse_large=False), stream, pieces)
    assert [(h.op, h.request_id, h.volume_id, h.epoch, h.offset, h.length, h.generation,
             payload) for h, payload in got] == [
        (op, rid, vid, epoch, offset, length, gen, payload)
        for op, rid, vid, epoch, offset, length, gen, payload in sent]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(min_value=1, max_value=512),
                                          max_size=20))
def test_garbage_is_refused_with_invalid_argument_only(data: bytes, pieces: list[int]) -> None:
    for reader in (wire.request_reader(reuse_large=True), wire.response_reader()):
        try:
            _feed(reader, data, pieces)
        except InvalidArgument:
            pass  # the stream cannot be trusted: the connection is closed


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=wire.REQUEST_HEADER.size, max_size=wire.REQUEST_HEADER.size))
def test_a_header_with_the_magic_and_anything_else_is_refused_or_decoded(raw: bytes) -> None:
    header = wire.encode_request_header(wire.Op.HELLO, 1)
    forged = header[:6] + raw[6:]  # the right magic and version, the rest anything
    try:
        got = _feed(wire.request_reader(reuse_large=True), forged, [])
    except InvalidArgument:
        return
    assert got == [] or got[0][0].payload_length == 0  # a whole frame only if it has no payload
