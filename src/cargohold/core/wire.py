"""The data server's binary protocol: frame layouts, encoding and decoding (no I/O).

Every frame is a fixed header in network byte order followed by ``payload_length`` bytes of
payload. docs/protocol.md describes the byte layout, the ops, the statuses and the epoch and
durability rules; this module is their single implementation, used by the data server and
by the data client.

Requests::

    magic "CH" | version u8 | op u8 | request id u32 | volume id 16 bytes | epoch u64 |
    offset u64 | length u32 | generation u64 | payload length u32      (56 bytes)

Responses::

    magic "CH" | version u8 | status u8 | request id u32 | payload length u32    (12 bytes)

``FrameReader`` reassembles frames from a byte stream for an ``asyncio.BufferedProtocol``:
large payloads are received straight into a buffer of their own, so a 1 MiB write is never
copied between the socket and ``pwrite``.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Any, Generic, NamedTuple, TypeVar

from cargohold.core import compiled
from cargohold.errors import InvalidArgument

MAGIC = b"CH"
VERSION = 1

#: The largest payload either side accepts; a frame announcing more is a broken stream.
MAX_PAYLOAD = 16 << 20

#: The most chunk generations one GENS answer carries (8 MiB: volumes up to 1 TiB at once).
MAX_GENS_CHUNKS = 1 << 20

#: A ``bytes``-like buffer accepted wherever data is sent.
BytesLike = bytes | bytearray | memoryview

REQUEST_HEADER = struct.Struct("!2sBBI16sQQIQI")
RESPONSE_HEADER = struct.Struct("!2sBBII")
U64 = struct.Struct("!Q")

NO_VOLUME = bytes(16)

#: The payload of a TRIM that stores a copy's zeros (resync, catch-up): its generation is
#: recorded on every chunk of the range. A plain TRIM (empty payload) records it only on
#: chunks written before, so that a trim of free space leaves never-written chunks at 0.
TRIM_COPY = b"\x01"

#: A data server also serves the protocol on this unix socket in its directory; engines on
#: the same host use it instead of TCP (same frames, less work per request).
LOCAL_SOCKET = "data.sock"


#: Random bytes at the end of the shared write buffers' file: a server that opened the file
#: SHARE names checks them, so that a path naming another process's file (another PID
#: namespace) is refused, not written from.
TOKEN_SIZE = 16


class Op(IntEnum):
    HELLO = 1  # server info (JSON); payload JSON {"copying": true}: a bulk copy's connection
    CREATE = 2  # payload JSON {"size": int}
    DELETE = 3
    STAT = 4  # replica info (JSON)
    READ = 5  # offset, length -> data
    WRITE = 6  # offset, generation, payload = data
    FLUSH = 7  # fdatasync the replica
    TRIM = 8  # offset, length, generation: punch a hole
    GENS = 9  # offset (chunk aligned), length = chunk count (0: up to MAX_GENS_CHUNKS) -> u64s
    FENCE = 10  # raise the replica's epoch to the request's epoch
    RESIZE = 11  # payload JSON {"size": int}: grow the replica to at least size -> JSON
    SHARE = 12  # payload JSON {"path", "token"}: map the client's write buffers (unix only)
    WRITE_SHARED = 13  # WRITE whose data lies in the shared buffers: payload u64 position
    AUTHORIZE = 14  # volume, epoch; payload: a capability (core/capability.py)
    SNAPSHOT = 15  # payload JSON {"id", "created"}: keep the replica as it is -> JSON info
    SNAPSHOTS = 16  # the snapshots the replica keeps -> JSON list
    SNAPSHOT_DELETE = 17  # payload JSON {"id"}: forget a snapshot -> JSON {"freed"}
    READ_SNAPSHOT = 18  # offset, length; payload JSON {"id"} -> the snapshot's data; with
    # "blocks" ([[chunk, [block, ...]], ...]) -> a batch of those blocks (core/chunkdelta.py)
    REVERT = 19  # generation; payload JSON {"id"}: read as the snapshot again -> {"changed"}
    SNAPSHOT_DIFF = 20  # payload JSON {"since", "until"} ("": none / now) -> JSON chunk list
    SNAPSHOT_SCRUB = 21  # read what snapshots hold apart -> JSON [{"snapshot", "offset"}] bad
    SNAPSHOT_REPAIR = 22  # offset, length 4096; payload: snapshot id (32 hex) + the block
    FILL = 23  # offset (chunk aligned), generation, payload = data: WRITE if never written
    WRITE_BLOCKS = 24  # offset (chunk aligned), generation, payload = some of the chunk's
    # 4 KiB blocks (core/chunkdelta.py): one request for a chunk's scattered changes


class Status(IntEnum):
    OK = 0
    NOT_FOUND = 1  # payload: utf-8 message
    FENCED = 2  # payload: the replica's current epoch, u64
    CHECKSUM = 3  # payload: byte offset of the first bad block, u64
    NO_SPACE = 4  # payload: utf-8 message
    INVALID = 5  # payload: utf-8 "what: detail"
    IO_ERROR = 6  # payload: utf-8 message
    FORBIDDEN = 7  # payload: utf-8 "what: detail"; no capability for this I/O
    REFUSED = 8  # payload: JSON {"code", "message"} of an error of errors.py (snapshots)


class RequestHeader(NamedTuple):
    op: int  # an ``Op`` value; unknown values are left for the server to refuse
    request_id: int
    volume_id: str  # 32 hex characters, "" for server-level ops
    epoch: int
    offset: int
    length: int
    generation: int
    payload_length: int


class ResponseHeader(NamedTuple):
    status: int
    request_id: int
    payload_length: int


@functools.lru_cache(maxsize=4096)
def volume_bytes(volume_id: str) -> bytes:
    """The 16 raw bytes of a 32-hex-character volume id ("" gives all zeros)."""
    if not volume_id:
        return NO_VOLUME
    try:
        raw = bytes.fromhex(volume_id)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise InvalidArgument(what="volume id", detail=f"{volume_id!r} is not 32 hex characters")
    return raw


def encode_request_header(
    op: Op,
    request_id: int,
    volume_id: str = "",
    *,
    epoch: int = 0,
    offset: int = 0,
    length: int = 0,
    generation: int = 0,
    payload_length: int = 0,
) -> bytes:
    if payload_length > MAX_PAYLOAD:
        raise InvalidArgument(what="payload", detail=f"{payload_length} bytes > {MAX_PAYLOAD}")
    try:
        return REQUEST_HEADER.pack(
            MAGIC,
            VERSION,
            op,
            request_id,
            volume_bytes(volume_id),
            epoch,
            offset,
            length,
            generation,
            payload_length,
        )
    except struct.error as exc:
        raise InvalidArgument(what="request", detail=str(exc)) from None


def encode_request(
    op: Op,
    request_id: int,
    volume_id: str = "",
    *,
    epoch: int = 0,
    offset: int = 0,
    length: int = 0,
    generation: int = 0,
    payload: BytesLike = b"",
) -> bytes:
    """A whole request frame (header and payload joined: for small frames and tests)."""
    header = encode_request_header(
        op,
        request_id,
        volume_id,
        epoch=epoch,
        offset=offset,
        length=length,
        generation=generation,
        payload_length=len(payload),
    )
    return header + payload


def decode_request_header(buffer: BytesLike, offset: int = 0) -> RequestHeader:
    """Decode the request header at ``buffer[offset:]``; a bad magic or version raises."""
    magic, version, op, rid, volume, epoch, pos, length, gen, plen = REQUEST_HEADER.unpack_from(
        buffer, offset
    )
    _check_frame(magic, version, plen)
    return RequestHeader(op, rid, volume_hex(volume), epoch, pos, length, gen, plen)


@functools.lru_cache(maxsize=4096)
def volume_hex(volume: bytes) -> str:
    """A volume id as 32 hex characters ("" for all zeros): ``volume_bytes`` backwards.

    Cached: a data server sees few volumes, each in every request.
    """
    return "" if volume == NO_VOLUME else volume.hex()


def decode_request(frame: BytesLike) -> tuple[RequestHeader, bytes]:
    """Decode one whole request frame."""
    header = decode_request_header(frame)
    payload = bytes(frame[REQUEST_HEADER.size :])
    if len(payload) != header.payload_length:
        raise InvalidArgument(
            what="frame",
            detail=f"payload is {len(payload)} bytes, header says {header.payload_length}",
        )
    return header, payload


def encode_response_header(status: Status, request_id: int, payload_length: int = 0) -> bytes:
    return RESPONSE_HEADER.pack(MAGIC, VERSION, status, request_id, payload_length)


def encode_response(status: Status, request_id: int, payload: BytesLike = b"") -> bytes:
    """A whole response frame (header and payload joined)."""
    return encode_response_header(status, request_id, len(payload)) + payload


def decode_response_header(buffer: BytesLike, offset: int = 0) -> ResponseHeader:
    magic, version, status, rid, plen = RESPONSE_HEADER.unpack_from(buffer, offset)
    _check_frame(magic, version, plen)
    return ResponseHeader(status, rid, plen)


def decode_response(frame: BytesLike) -> tuple[ResponseHeader, bytes]:
    """Decode one whole response frame."""
    header = decode_response_header(frame)
    payload = bytes(frame[RESPONSE_HEADER.size :])
    if len(payload) != header.payload_length:
        raise InvalidArgument(
            what="frame",
            detail=f"payload is {len(payload)} bytes, header says {header.payload_length}",
        )
    return header, payload


def _check_frame(magic: bytes, version: int, payload_length: int) -> None:
    if magic != MAGIC:
        raise InvalidArgument(what="frame", detail=f"bad magic {magic!r}")
    if version != VERSION:
        raise InvalidArgument(what="frame", detail=f"unsupported protocol version {version}")
    if payload_length > MAX_PAYLOAD:
        raise InvalidArgument(what="frame", detail=f"payload of {payload_length} bytes is too big")


def _frame_error(detail: str) -> InvalidArgument:
    return InvalidArgument(what="frame", detail=detail)


#: The Python decoders: the reference for the compiled ones (``core/_frames.c``), which
#: replace them below where they were built, unless ``CARGOHOLD_COMPILED=0``.
python_decode_request_header = decode_request_header
python_decode_response_header = decode_response_header
try:
    from cargohold.core import _frames  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - built by setup.py where a C compiler is
    _frames = None
if _frames is not None:
    _frames.configure(RequestHeader, ResponseHeader, _frame_error, struct.error)
    if compiled.wanted():
        decode_request_header = _frames.decode_request_header  # noqa: F811
        decode_response_header = _frames.decode_response_header  # noqa: F811


# --- payloads --------------------------------------------------------------------------


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def decode_u64(payload: BytesLike) -> int:
    if len(payload) != U64.size:
        raise InvalidArgument(what="payload", detail=f"expected 8 bytes, got {len(payload)}")
    value: int = U64.unpack(payload)[0]
    return value


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode_json(payload: BytesLike) -> Any:
    try:
        return json.loads(bytes(payload))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(what="payload", detail=f"not JSON: {exc}") from None


def encode_text(text: str) -> bytes:
    return text.encode("utf-8", "replace")[:4096]


def decode_text(payload: BytesLike) -> str:
    return bytes(payload).decode("utf-8", "replace")


# --- stream reassembly -----------------------------------------------------------------

H = TypeVar("H", RequestHeader, ResponseHeader)


class FrameReader(Generic[H]):
    """Cut a byte stream into ``(header, payload)`` frames without needless copies.

    Use it from ``asyncio.BufferedProtocol``: ``get_buffer()`` returns where the transport
    should receive next and ``feed(n)`` returns the frames completed by those ``n`` bytes.
    Small frames are parsed in place from one reusable buffer: their payload views are valid
    only until the next ``get_buffer()``. A payload larger than ``large`` bytes is received
    into a ``bytearray`` of its own, which the caller may keep; with ``reuse_large`` (for a
    caller that is done with each payload before the next ``get_buffer()``, like the data
    server) one such buffer is kept and reused instead, so that a stream of 1 MiB writes
    allocates (and zero-fills) nothing per request.
    A malformed header raises ``InvalidArgument``: the stream cannot be trusted after that.
    """

    def __init__(
        self,
        decode: Callable[[BytesLike, int], H],
        header_size: int,
        *,
        buffer_size: int = 256 << 10,
        large: int = 64 << 10,
        reuse_large: bool = False,
    ) -> None:
        if buffer_size < header_size + large:
            raise ValueError("buffer_size must hold a header and a large payload")
        self._decode: Callable[[BytesLike, int], H] = decode
        self._header_size = header_size
        self._large_threshold = large
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet consumed
        self._end = 0  # first byte not yet received
        self._large: memoryview | None = None
        self._large_filled = 0
        self._large_header: H | None = None
        self._reuse_large = reuse_large
        self._spare: bytearray | None = None  # the reused large buffer (``reuse_large``)

    def owns(self, payload: memoryview) -> bool:
        """Whether ``payload`` (from ``feed``) is a view of the reader's reusable buffer.

        Such a view must be copied before the next ``get_buffer()``; any other payload was
        received into a buffer of its own and may be kept as it is.
        """
        return payload.obj is self._buf or (
            self._spare is not None and payload.obj is self._spare
        )

    def partial(self) -> bool:
        """Whether part of a frame has arrived and waits for the rest."""
        return self._large is not None or self._end > self._start

    def get_buffer(self) -> memoryview:
        if self._large is not None:
            return self._large[self._large_filled :]
        if self._start:
            left = self._end - self._start
            if left:
                self._buf[:left] = self._buf[self._start : self._end]
            self._start, self._end = 0, left
        return self._view[self._end :]

    def feed(self, nbytes: int) -> list[tuple[H, memoryview]]:
        frames: list[tuple[H, memoryview]] = []
        if self._large is not None:
            self._large_filled += nbytes
            if self._large_filled == len(self._large):
                assert self._large_header is not None
                frames.append((self._large_header, self._large))
                self._large, self._large_header, self._large_filled = None, None, 0
            return frames
        self._end += nbytes
        view, pos, end, hsize = self._view, self._start, self._end, self._header_size
        while end - pos >= hsize:
            header = self._decode(view, pos)
            plen = header.payload_length
            body = pos + hsize
            if end - body >= plen:
                frames.append((header, view[body : body + plen]))
                pos = body + plen
                continue
            pos = self._wait(header, pos, body, end)
            break
        self._consumed(pos, end)
        return frames

    def each(self, nbytes: int, handle: Callable[[H, memoryview], object],
             fast: Callable[[memoryview, int, int], int] | None = None) -> None:
        """``feed``, but each frame goes to ``handle`` as soon as it is cut, in order; before
        each, ``fast`` (if given) may serve a run of whole frames in place: it gets the buffer
        and the range received and returns where the first frame it left begins."""
        if self._large is not None:
            for header, payload in self.feed(nbytes):
                handle(header, payload)
            return
        self._end += nbytes
        view, pos, end, hsize = self._view, self._start, self._end, self._header_size
        try:
            while end - pos >= hsize:
                if fast is not None:
                    pos = fast(view, pos, end)
                    if end - pos < hsize:
                        break
                header = self._decode(view, pos)
                plen = header.payload_length
                body = pos + hsize
                if end - body >= plen:
                    pos = body + plen
                    handle(header, view[body:pos])
                    continue
                pos = self._wait(header, pos, body, end)
                break
        finally:
            self._consumed(pos, end)

    def _wait(self, header: H, pos: int, body: int, end: int) -> int:
        """A frame at ``pos`` whose payload is not all here: a large one goes on into a
        buffer of its own (returns ``end``), a small one waits in this one (returns ``pos``)."""
        plen = header.payload_length
        if plen <= self._large_threshold:
            return pos
        large = self._large_buffer(plen)
        have = end - body
        large[:have] = self._view[body:end]
        self._large, self._large_filled, self._large_header = large, have, header
        return end

    def _consumed(self, pos: int, end: int) -> None:
        if pos == end:
            self._start = self._end = 0
        else:
            self._start = pos

    def _large_buffer(self, size: int) -> memoryview:
        if not self._reuse_large:
            return memoryview(bytearray(size))
        spare = self._spare
        if spare is None or len(spare) < size:
            spare = self._spare = bytearray(size)
        return memoryview(spare)[:size]


def request_reader(*, reuse_large: bool = False) -> FrameReader[RequestHeader]:
    return FrameReader(decode_request_header, REQUEST_HEADER.size, reuse_large=reuse_large)


def response_reader() -> FrameReader[ResponseHeader]:
    return FrameReader(decode_response_header, RESPONSE_HEADER.size)
