"""The frame headers decoded in C (core/_frames.c) against wire.py's Python decoders, the
reference: the same headers, the same errors, for hypothesis's headers and byte strings; a
stream cut anywhere gives the same frames; and the C parsers fuzzed with libFuzzer under
AddressSanitizer and UndefinedBehaviorSanitizer for a bounded time."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cargohold.core import compiled, wire
from cargohold.core.wire import FrameReader

ROOT = Path(__file__).resolve().parents[2]
needs_c = pytest.mark.skipif(wire._frames is None, reason="core/_frames.c is not built")


def outcome(decode: object, buffer: bytes, offset: int) -> tuple[str, object]:
    try:
        return "ok", decode(buffer, offset)  # type: ignore[operator]
    except Exception as exc:  # the type and the words are part of the contract
        return type(exc).__name__, str(exc)


def test_the_compiled_decoders_are_built_and_used_unless_the_flag_says() -> None:
    assert wire._frames is not None  # pip install -e . builds core/_frames.c
    used = wire.decode_request_header is wire._frames.decode_request_header
    assert used == compiled.wanted()  # CARGOHOLD_COMPILED=0: the Python ones


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
requests = st.builds(
    lambda op, rid, volume, epoch, offset, length, gen, plen: wire.REQUEST_HEADER.pack(
        wire.MAGIC, wire.VERSION, op, rid, volume, epoch, offset, length, gen, plen),
    st.integers(0, 255), u32, st.one_of(st.just(bytes(16)), st.binary(min_size=16,
                                                                      max_size=16)),
    u64, u64, u32, u64, st.one_of(st.integers(0, wire.MAX_PAYLOAD + 2), u32))
responses = st.builds(
    lambda status, rid, plen: wire.RESPONSE_HEADER.pack(wire.MAGIC, wire.VERSION, status,
                                                        rid, plen),
    st.integers(0, 255), u32, st.one_of(st.integers(0, wire.MAX_PAYLOAD + 2), u32))


@needs_c
@settings(max_examples=2000, deadline=None)
@given(st.one_of(requests, responses), st.binary(max_size=80), st.integers(0, 70),
       st.integers(0, 80), st.binary(max_size=3))
def test_both_decoders_give_the_same_answer(header: bytes, noise: bytes, cut: int,
                                            offset: int, patch: bytes) -> None:
    """Whole headers, headers with some bytes replaced (magic, version, anything), short
    buffers and offsets beyond the end."""
    buffers = [header, noise, header[:cut], noise + header]
    if patch:
        at = cut % max(1, len(header))
        buffers.append(header[:at] + patch + header[at + len(patch):])
    for buffer in buffers:
        for at in {0, offset, len(noise)}:
            assert outcome(wire._frames.decode_request_header, buffer, at) == outcome(
                wire.python_decode_request_header, buffer, at), (buffer, at)
            assert outcome(wire._frames.decode_response_header, buffer, at) == outcome(
                wire.python_decode_response_header, buffer, at), (buffer, at)


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 24), st.binary(max_size=300)), min_size=1,
                max_size=20), st.lists(st.integers(1, 400), min_size=1, max_size=50))
def test_a_stream_cut_anywhere_gives_the_same_frames(frames: list[tuple[int, bytes]],
                                                     cuts: list[int]) -> None:
    stream = b"".join(wire.encode_request(wire.Op(op), i, "ab" * 16, offset=i * 4096,
                                          payload=payload)
                      for i, (op, payload) in enumerate(frames))
    got = []
    for decode in (wire._frames.decode_request_header, wire.python_decode_request_header):
        reader = FrameReader(decode, wire.REQUEST_HEADER.size, buffer_size=1024, large=128)
        out, pos, k = [], 0, 0
        while pos < len(stream):
            buffer = reader.get_buffer()
            n = min(len(buffer), cuts[k % len(cuts)], len(stream) - pos)
            buffer[:n] = stream[pos:pos + n]
            pos, k = pos + n, k + 1
            out += [(h, bytes(p)) for h, p in reader.feed(n)]
        got.append(out)
    assert got[0] == got[1] and len(got[0]) == len(frames)


@needs_c
def test_a_negative_offset_is_refused() -> None:
    header = wire.encode_request_header(wire.Op.READ, 1)
    decode = wire._frames.decode_request_header
    with pytest.raises(ValueError):
        decode(header, -1)
    with pytest.raises(TypeError):
        decode()


@pytest.mark.skipif(shutil.which("clang") is None, reason="needs clang (libFuzzer)")
def test_the_parsers_under_libfuzzer(tmp_path: Path) -> None:
    """Bounded: 20 s of inputs, or a crash (a sanitizer's report) fails it."""
    target = tmp_path / "frames_fuzz"
    subprocess.run(["clang", "-g", "-O1", "-fsanitize=fuzzer,address,undefined",
                    "-fno-sanitize-recover=undefined", "-Wall", "-Wextra", "-Werror",
                    str(ROOT / "tests" / "fuzz" / "frames_fuzz.c"), "-o", str(target)],
                   check=True, capture_output=True, timeout=180)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "request").write_bytes(wire.encode_request(wire.Op.WRITE, 1, "ab" * 16,
                                                         payload=b"x"))
    (corpus / "response").write_bytes(wire.encode_response(wire.Status.OK, 1, b"y"))
    done = subprocess.run([str(target), "-max_total_time=20", "-max_len=128",
                           f"-artifact_prefix={tmp_path}/", str(corpus)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "UBSAN_OPTIONS": "halt_on_error=1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Done" in done.stderr and "runs in" in done.stderr, done.stderr[-2000:]
    assert not list(tmp_path.glob("crash-*"))


def test_struct_sizes_match_the_c_parsers() -> None:
    source = (ROOT / "src" / "cargohold" / "core" / "_frames.c").read_text()
    assert f"#define REQUEST_SIZE {wire.REQUEST_HEADER.size}" in source
    assert f"#define RESPONSE_SIZE {wire.RESPONSE_HEADER.size}" in source
    assert f"#define FRAME_MAX_PAYLOAD ({wire.MAX_PAYLOAD >> 20}u << 20)" in source
    assert struct.calcsize("!2sBBII") == 12
