# SPDX-License-Identifier: Apache-2.0
"""On-disk format of one stored KV chunk: a fixed 4 KiB header, then the payload, 4 KiB-aligned.

Runs in the vLLM worker process (the storage tier's I/O threads).

The header is binary and fixed-layout: nothing in a stored file is ever
unpickled or evaluated. Every field that decides whether the bytes may be used
is in it and is checked on read; any mismatch raises :class:`ChunkRejected`,
which the tier treats as a miss (and removes the file)::

    offset  size  field
    0       8     magic b"KVPLUGIN"
    8       4     format version (u32)
    12      4     header CRC32C (u32, over the whole header with this field zeroed)
    16      8     payload length in bytes (u64)
    24      4     payload CRC32C (u32)
    28      4     ndim (u32, ≤ 8)
    32      64    shape (8 × u64)
    96      2+n   dtype name, UTF-8, length-prefixed (u16)
    …       2+n   memory format (LMCache's ``MemoryFormat`` name), length-prefixed
    …       2+n   layout fingerprint, length-prefixed
    …       2+n   full cache key, length-prefixed
    …             zero padding to 4096
    4096          payload, zero-padded to a multiple of 4096 (O_DIRECT sizes)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c as _crc32c

MAGIC = b"KVPLUGIN"
FORMAT_VERSION = 1
ALIGN = 4096
HEADER_SIZE = ALIGN
_FIXED = struct.Struct("<8sIIQII8Q")  # magic, version, header crc, payload len, payload crc, ndim, shape
_MAX_NDIM = 8
MAX_PAYLOAD = 1 << 34  # 16 GiB: far above any real chunk, far below what a reader could allocate


class ChunkRejected(Exception):
    """A stored chunk that must not be used: corrupt, truncated, foreign or from another format."""


@dataclass(frozen=True)
class ChunkHeader:
    key: str
    dtype: str
    shape: tuple[int, ...]
    fingerprint: str
    payload_len: int
    payload_crc: int
    memory_format: str = ""


def aligned(n: int) -> int:
    """``n`` rounded up to the I/O alignment."""
    return -(-n // ALIGN) * ALIGN


def crc32c(data) -> int:
    """CRC32C (hardware-accelerated) of any bytes-like object, read in place.

    The ``crc32c`` package takes any buffer without copying it and releases the
    GIL on large ones, so the tier's I/O threads checksum in parallel.
    """
    return _crc32c.crc32c(data)


def _text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<H", len(raw)) + raw


def encode_header(header: ChunkHeader) -> bytes:
    """The 4096-byte header for ``header``."""
    if len(header.shape) > _MAX_NDIM:
        raise ValueError(f"shape {header.shape} has more than {_MAX_NDIM} dimensions")
    if header.payload_len > MAX_PAYLOAD:
        raise ValueError(f"payload of {header.payload_len} bytes exceeds the format's {MAX_PAYLOAD}")
    shape = list(header.shape) + [0] * (_MAX_NDIM - len(header.shape))
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, 0, header.payload_len, header.payload_crc, len(header.shape), *shape)
    body = fixed + b"".join(_text(t) for t in (header.dtype, header.memory_format, header.fingerprint, header.key))
    if len(body) > HEADER_SIZE:
        raise ValueError(f"cache key too long for a {HEADER_SIZE}-byte header ({len(body)} bytes)")
    raw = bytearray(body.ljust(HEADER_SIZE, b"\0"))
    struct.pack_into("<I", raw, 12, crc32c(bytes(raw)))
    return bytes(raw)


def decode_header(raw: bytes, expected_key: str | None = None) -> ChunkHeader:
    """Parse and verify a header; ``expected_key`` guards against a file holding another key.

    Raises:
        ChunkRejected: bad magic, other format version, header checksum mismatch, bad
            lengths, or a different key.
    """
    if len(raw) < HEADER_SIZE:
        raise ChunkRejected(f"truncated header ({len(raw)} bytes)")
    raw = bytes(raw[:HEADER_SIZE])
    magic, version, header_crc, payload_len, payload_crc, ndim, *shape = _FIXED.unpack_from(raw)
    if magic != MAGIC:
        raise ChunkRejected("not a vllm-kvplugin chunk (bad magic)")
    if version != FORMAT_VERSION:
        raise ChunkRejected(f"chunk format version {version}, this build reads {FORMAT_VERSION}")
    if crc32c(raw[:12] + b"\0\0\0\0" + raw[16:]) != header_crc:
        raise ChunkRejected("header checksum mismatch")
    _check_sizes(payload_len, ndim)
    fields, offset = [], _FIXED.size
    try:
        for _ in range(4):
            (length,) = struct.unpack_from("<H", raw, offset)
            fields.append(raw[offset + 2 : offset + 2 + length].decode())
            offset += 2 + length
    except (struct.error, UnicodeDecodeError) as e:  # a checksum is not a signature: stay defensive
        raise ChunkRejected(f"malformed header fields: {e}") from e
    dtype, memory_format, fingerprint, key = fields
    if expected_key is not None and key != expected_key:
        raise ChunkRejected("file holds a different cache key")
    return ChunkHeader(key, dtype, tuple(shape[:ndim]), fingerprint, payload_len, payload_crc, memory_format)


def _check_sizes(payload_len: int, ndim: int) -> None:
    """Refuse a length no writer produces, before anyone sizes a buffer by it.

    The shape is checked against the length where the dtype is known (the
    LMCache tier, before it allocates); a negative dimension reads as a huge
    u64 there.
    """
    if ndim > _MAX_NDIM:
        raise ChunkRejected(f"bad ndim {ndim}")
    if payload_len > MAX_PAYLOAD:
        raise ChunkRejected(f"payload length {payload_len} exceeds {MAX_PAYLOAD}")


def check_payload(header: ChunkHeader, payload) -> None:
    """Raise :class:`ChunkRejected` unless ``payload`` (exactly ``payload_len`` bytes) matches its checksum."""
    if len(payload) != header.payload_len:
        raise ChunkRejected(f"payload is {len(payload)} bytes, header says {header.payload_len}")
    if crc32c(payload) != header.payload_crc:
        raise ChunkRejected("payload checksum mismatch")
