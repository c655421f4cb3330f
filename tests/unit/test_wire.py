from __future__ import annotations

import struct
import uuid

import pytest

from cargohold.core import wire
from cargohold.core.wire import Op, RequestHeader, ResponseHeader, Status
from cargohold.errors import InvalidArgument

VOLUME = uuid.uuid4().hex


def test_request_round_trip() -> None:
    frame = wire.encode_request(
        Op.WRITE, 7, VOLUME, epoch=3, offset=1 << 40, length=4, generation=9, payload=b"data"
    )
    assert len(frame) == wire.REQUEST_HEADER.size + 4 == 60
    header, payload = wire.decode_request(frame)
    assert header == RequestHeader(Op.WRITE, 7, VOLUME, 3, 1 << 40, 4, 9, 4)
    assert payload == b"data"


def test_request_layout_is_network_order() -> None:
    frame = wire.encode_request(Op.READ, 0x01020304, VOLUME, epoch=1, offset=2, length=3)
    assert frame[:2] == b"CH" and frame[2] == 1 and frame[3] == Op.READ
    assert frame[4:8] == b"\x01\x02\x03\x04"
    assert frame[8:24] == bytes.fromhex(VOLUME)
    assert struct.unpack("!QQIQI", frame[24:56]) == (1, 2, 3, 0, 0)


def test_server_level_request_has_no_volume() -> None:
    frame = wire.encode_request(Op.HELLO, 1)
    assert frame[8:24] == bytes(16)
    assert wire.decode_request(frame)[0].volume_id == ""


def test_response_round_trip() -> None:
    frame = wire.encode_response(Status.FENCED, 99, wire.encode_u64(12))
    assert len(frame) == wire.RESPONSE_HEADER.size + 8 == 20
    header, payload = wire.decode_response(frame)
    assert header == ResponseHeader(Status.FENCED, 99, 8)
    assert wire.decode_u64(payload) == 12


def test_payload_helpers() -> None:
    assert wire.decode_json(wire.encode_json({"size": 5})) == {"size": 5}
    assert wire.decode_text(wire.encode_text("héllo")) == "héllo"
    with pytest.raises(InvalidArgument):
        wire.decode_json(b"{nope")
    with pytest.raises(InvalidArgument):
        wire.decode_u64(b"\0")


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (b"XX" + wire.encode_request(Op.HELLO, 1)[2:], "magic"),
        (b"CH\x02" + wire.encode_request(Op.HELLO, 1)[3:], "version"),
    ],
)
def test_bad_request_frames_are_rejected(frame: bytes, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        wire.decode_request(frame)


def test_bad_response_frames_are_rejected() -> None:
    good = wire.encode_response(Status.OK, 1)
    with pytest.raises(InvalidArgument, match="magic"):
        wire.decode_response(b"ch" + good[2:])
    with pytest.raises(InvalidArgument, match="version"):
        wire.decode_response(good[:2] + b"\x09" + good[3:])
    with pytest.raises(InvalidArgument, match="payload"):
        wire.decode_response(good + b"extra")


def test_oversized_payload_is_rejected() -> None:
    header = wire.REQUEST_HEADER.pack(
        b"CH", 1, Op.WRITE, 1, bytes(16), 0, 0, 0, 0, wire.MAX_PAYLOAD + 1
    )
    with pytest.raises(InvalidArgument, match="too big"):
        wire.decode_request_header(header)
    with pytest.raises(InvalidArgument):
        wire.encode_request_header(Op.WRITE, 1, payload_length=wire.MAX_PAYLOAD + 1)


def test_bad_volume_ids_are_rejected() -> None:
    for bad in ("xyz", VOLUME[:-2], VOLUME + "00", "g" * 32):
        with pytest.raises(InvalidArgument):
            wire.encode_request(Op.STAT, 1, bad)


def _feed_all(
    reader: wire.FrameReader[RequestHeader], stream: bytes, step: int
) -> list[tuple[RequestHeader, bytes]]:
    out: list[tuple[RequestHeader, bytes]] = []
    pos = 0
    while pos < len(stream):
        buf = reader.get_buffer()
        n = min(step, len(buf), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        pos += n
        out.extend((h, bytes(p)) for h, p in reader.feed(n))
    return out


@pytest.mark.parametrize("step", [1, 7, 4096, 100_000, 1 << 22])
def test_frame_reader_reassembles_any_split(step: int) -> None:
    payloads = [b"", b"a" * 4096, bytes(range(256)) * 4096, b"b" * 70_000, b"c" * 12]
    stream = b"".join(
        wire.encode_request(Op.WRITE, i, VOLUME, epoch=1, length=len(p), payload=p)
        for i, p in enumerate(payloads)
    )
    frames = _feed_all(wire.request_reader(), stream, step)
    assert [h.request_id for h, _ in frames] == list(range(len(payloads)))
    assert [p for _, p in frames] == payloads


def test_frame_reader_gives_large_payloads_their_own_buffer() -> None:
    reader = wire.request_reader()
    data = b"z" * (1 << 20)
    stream = wire.encode_request(Op.WRITE, 1, VOLUME, epoch=1, length=len(data), payload=data)
    frames = []
    pos = 0
    while pos < len(stream):
        buf = reader.get_buffer()
        n = min(len(buf), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        pos += n
        frames.extend(reader.feed(n))
    ((header, payload),) = frames
    assert header.payload_length == len(data)
    assert isinstance(payload.obj, bytearray) and len(payload.obj) == len(data)
    assert payload == data


def test_frame_reader_rejects_garbage() -> None:
    reader = wire.request_reader()
    buf = reader.get_buffer()
    garbage = b"GET / HTTP/1.1\r\n" * 8
    buf[: len(garbage)] = garbage
    with pytest.raises(InvalidArgument):
        reader.feed(len(garbage))


def test_frame_reader_can_reuse_one_buffer_for_large_payloads() -> None:
    reader = wire.request_reader(reuse_large=True)
    payloads = [b"x" * (1 << 20), b"y" * 100_000, b"z" * (1 << 20)]
    stream = b"".join(
        wire.encode_request(Op.WRITE, i, VOLUME, epoch=1, length=len(p), payload=p)
        for i, p in enumerate(payloads)
    )
    seen: list[tuple[int, bytes]] = []
    owners = set()
    pos = 0
    while pos < len(stream):
        buf = reader.get_buffer()
        n = min(len(buf), len(stream) - pos, 50_000)
        buf[:n] = stream[pos : pos + n]
        pos += n
        for header, payload in reader.feed(n):
            if len(payload) > 64 << 10:
                assert reader.owns(payload)  # reused: valid only until the next get_buffer
                owners.add(id(payload.obj))
            seen.append((header.request_id, bytes(payload)))
    assert seen == list(enumerate(payloads))
    assert len(owners) == 1
