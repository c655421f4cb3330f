"""Encryption at rest: AES-256-XTS per 4 KiB block, and the wrapping of volume keys.

An encrypted volume's engine encrypts every block before it leaves the host, so data
servers, the network, and copies made from replicas (snapshots, backups) hold only
ciphertext. Each 4 KiB block is one XTS data unit whose tweak is its block number (16 bytes,
little-endian: dm-crypt's ``plain64`` with 4 KiB sectors), so blocks are encrypted and
decrypted independently, at any offset.

A block of all zeros *as stored* reads as zeros: that is what a never-written or trimmed
block is on a data server, and what a file system expects to find there. (A real ciphertext
block of 4096 zero bytes has a chance of 2^-32768.)

The per-block work runs in the C extension ``core/_xts.c`` (built by the package's build;
XTS made of one ECB call per 64 KiB and the masks computed in C, with the GIL released),
else in OpenSSL's libcrypto through ctypes, with one context per direction whose tweak is
reset per block: building a ``cryptography`` cipher object per block costs ~10 us, which
would cap a volume at ~300 MB/s. ``tests/unit/test_cipher.py`` checks both against
``cryptography``'s XTS, block by block.

Volume keys (64 random bytes, or the user's) are stored in the metadata store only wrapped:
AES-256-GCM under a key derived (HKDF-SHA256) from the cluster key that only nodes hold,
with the volume id as associated data.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cargohold.core.wire import BytesLike
from cargohold.errors import InvalidArgument

try:
    from cargohold.core import _xts  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler or OpenSSL's headers
    _xts = None

BLOCK = 4096
KEY_SIZE = 64  # AES-256-XTS: two AES-256 keys
CIPHER = "aes-256-xts-plain64/4096"
ZERO_BLOCK = bytes(BLOCK)
_TWEAK = struct.Struct("<Q")  # the low 8 bytes of the 16-byte tweak; the high ones stay 0
_WRAP_INFO = b"cargohold volume key wrapping 1"

_lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
_lib.EVP_aes_256_xts.restype = ctypes.c_void_p
_lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
_lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
_INIT = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_UPDATE = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
           ctypes.c_int]
for _name, _types in (("EVP_EncryptInit_ex", _INIT), ("EVP_DecryptInit_ex", _INIT),
                      ("EVP_EncryptUpdate", _UPDATE), ("EVP_DecryptUpdate", _UPDATE)):
    getattr(_lib, _name).argtypes = _types
    getattr(_lib, _name).restype = ctypes.c_int


def _address(buffer: object, writable: bool = False) -> tuple[int, object]:
    """The address of ``buffer``'s bytes and what keeps them alive."""
    if isinstance(buffer, bytes) and not writable:
        keep = ctypes.c_char_p(buffer)
        return ctypes.cast(keep, ctypes.c_void_p).value or 0, keep
    view = memoryview(buffer)  # type: ignore[arg-type]
    if view.readonly:
        if writable:
            raise InvalidArgument(what="cipher output", detail="read-only buffer")
        copy = bytes(view)
        return _address(copy)
    array = (ctypes.c_char * view.nbytes).from_buffer(view)
    return ctypes.addressof(array), array


class VolumeCipher:
    """Encrypts and decrypts whole 4 KiB blocks of one volume with its 64-byte key."""

    def __init__(self, key: bytes, compiled: bool = True) -> None:
        """``compiled``: use the C extension if it was built (False: the ctypes path)."""
        if len(key) != KEY_SIZE:
            raise InvalidArgument(what="volume key", detail=f"{len(key)} bytes, not {KEY_SIZE}")
        if key[:32] == key[32:]:
            raise InvalidArgument(what="volume key", detail="its two halves are equal (XTS "
                                  "needs two different AES keys)")
        self._contexts = []
        for init in (_lib.EVP_EncryptInit_ex, _lib.EVP_DecryptInit_ex):
            context = _lib.EVP_CIPHER_CTX_new()
            secret = ctypes.create_string_buffer(key, KEY_SIZE)
            if not context or init(context, _lib.EVP_aes_256_xts(), None,
                                   ctypes.addressof(secret), None) != 1:
                raise InvalidArgument(what="volume key", detail="OpenSSL refused it")
            self._contexts.append(context)
        self._written = ctypes.c_int(0)
        self._written_ref = ctypes.byref(self._written)
        self._tweak = ctypes.create_string_buffer(16)  # the block number, little-endian
        self._tweak_at = ctypes.addressof(self._tweak)
        self._compiled = _xts.new(key) if compiled and _xts is not None else None

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def close(self) -> None:
        for context in self._contexts:
            _lib.EVP_CIPHER_CTX_free(context)
        self._contexts = []

    def __del__(self) -> None:
        self.close()

    def _run(self, decrypt: bool, block: int, data: object, out: object) -> None:
        if self._compiled is not None:
            try:
                _xts.crypt(self._compiled, block, data, out, decrypt)
            except (ValueError, RuntimeError) as e:
                raise InvalidArgument(what="cipher", detail=str(e)) from None
            return
        context = self._contexts[decrypt]
        init = _lib.EVP_DecryptInit_ex if decrypt else _lib.EVP_EncryptInit_ex
        update = _lib.EVP_DecryptUpdate if decrypt else _lib.EVP_EncryptUpdate
        source, keep_in = _address(data)
        target, keep_out = _address(out, writable=True)
        length = len(memoryview(data))  # type: ignore[arg-type]
        if length % BLOCK or len(memoryview(out)) < length:  # type: ignore[arg-type]
            raise InvalidArgument(what="cipher", detail="whole 4 KiB blocks only")
        written, tweak, pack = self._written_ref, self._tweak, _TWEAK.pack_into
        tweak_at = self._tweak_at
        for at in range(0, length, BLOCK):
            pack(tweak, 0, block)
            block += 1
            if (init(context, None, None, None, tweak_at) != 1
                    or update(context, target + at, written, source + at, BLOCK) != 1):
                raise InvalidArgument(what="cipher", detail="OpenSSL failed")
        del keep_in, keep_out

    def encrypt(self, block: int, data: object, out: object | None = None) -> object:
        """Encrypt whole blocks, the first being block number ``block``, into ``out`` (may
        be ``data`` itself, if writable) or a new bytearray; returns the ciphertext."""
        target = out if out is not None else bytearray(len(memoryview(data)))  # type: ignore[arg-type]
        self._run(False, block, data, target)
        return target

    def decrypt(self, block: int, data: BytesLike, in_place: bool = False) -> BytesLike:
        """Decrypt whole blocks read from replicas; blocks stored as zeros read as zeros.
        ``in_place``: into ``data`` itself, if it is writable (the caller's own buffer)."""
        view = memoryview(data)
        if in_place and not view.readonly and self._compiled is not None:
            self._run(True, block, view, view)  # zeros are found before anything changes
            return data
        out = bytearray(view.nbytes)
        self._run(True, block, view, out)
        if self._compiled is not None:
            return out  # the C extension keeps the zeros itself
        for at in range(0, view.nbytes, BLOCK):
            if view[at:at + BLOCK] == ZERO_BLOCK:
                out[at:at + BLOCK] = ZERO_BLOCK
        return out


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def read_key(text: bytes) -> bytes:
    """A user's volume key: 64 bytes, raw or as 128 hex digits (a trailing newline aside)."""
    if len(text) == KEY_SIZE:
        key = text
    else:
        try:
            key = bytes.fromhex(text.decode().strip())
        except (UnicodeDecodeError, ValueError):
            key = b""
    if len(key) != KEY_SIZE or key[:32] == key[32:]:
        raise InvalidArgument(what="volume key", detail=f"a key is {KEY_SIZE} random bytes, raw "
                              f"or as {2 * KEY_SIZE} hex digits (e.g. `head -c 64 "
                              "/dev/urandom > key`)")
    return key


def _kek(cluster_key: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=_WRAP_INFO).derive(cluster_key)
    return AESGCM(derived)


def wrap_key(cluster_key: bytes, volume_id: str, key: bytes) -> str:
    """``key`` encrypted for the metadata store (base64 of nonce and ciphertext)."""
    nonce = os.urandom(12)
    sealed = _kek(cluster_key).encrypt(nonce, key, bytes.fromhex(volume_id))
    return base64.b64encode(nonce + sealed).decode()


def unwrap_key(cluster_key: bytes, volume_id: str, wrapped: str) -> bytes:
    try:
        blob = base64.b64decode(wrapped)
        return _kek(cluster_key).decrypt(blob[:12], blob[12:], bytes.fromhex(volume_id))
    except (InvalidTag, ValueError):
        raise InvalidArgument(what="volume key", detail=f"volume {volume_id}'s key does not "
                              "open with this cluster's key") from None
