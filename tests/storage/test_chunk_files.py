# SPDX-License-Identifier: Apache-2.0
"""Chunk file format and I/O engines on real files: round trips, O_DIRECT, and every way a file can go bad."""

import ctypes
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvplugin.storage.format import (
    ALIGN, HEADER_SIZE, ChunkHeader, ChunkRejected, crc32c, decode_header, encode_header,
)
from vllm_kvplugin.storage.io import PosixIO, choose_io, dio_alignment

KEY = "model@kvplugin1/cpu-avx2/LBHNC/bs32@1@0@c0ffee@bfloat16"


def chunk(payload: bytes, key: str = KEY) -> tuple[bytes, bytes]:
    header = ChunkHeader(key, "bfloat16", (2, 4, 256, 128), "kvplugin1/cpu-avx2/LBHNC/bs32", len(payload), crc32c(payload))
    return encode_header(header), payload


@pytest.fixture(params=[(True, True), (False, True), (True, False)],
                ids=["odirect", "buffered", "odirect-header-first"])
def io(request, monkeypatch):
    """PosixIO; "header-first": every file is over the size read whole in one call (a large chunk)."""
    direct, one_read = request.param
    if not one_read:
        monkeypatch.setattr("vllm_kvplugin.storage.io.ONE_READ_MAX", 0)
    return PosixIO(direct=direct)


def test_round_trip_is_exact_and_leaves_no_temporary_files(tmp_path, io):
    payload = os.urandom(3 * ALIGN + 123)  # not a multiple of the alignment
    path = str(tmp_path / "c1")
    io.write(path, *chunk(payload))
    header, data = io.read(path, KEY)
    assert bytes(data) == payload and header.shape == (2, 4, 256, 128) and header.dtype == "bfloat16"
    assert os.listdir(tmp_path) == ["c1"]
    assert os.path.getsize(path) % ALIGN == 0  # whole aligned blocks: O_DIRECT-readable
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_o_direct_is_chosen_on_this_filesystem_and_buffers_are_aligned(tmp_path):
    engine = choose_io(str(tmp_path))
    alignment = dio_alignment(str(tmp_path / ".")) or dio_alignment(__file__)
    assert engine.direct and engine.name == "posix-odirect", alignment
    buf = engine._staging.get(5 * ALIGN)
    assert ctypes.addressof(ctypes.c_char.from_buffer(buf)) % ALIGN == 0
    if alignment is not None:
        assert ALIGN % alignment.offset == 0 and ALIGN % alignment.memory == 0


def rewrite_header(path, **changes):
    raw = bytearray(open(path, "rb").read())
    if "version" in changes:
        struct.pack_into("<I", raw, 8, changes["version"])
    if "magic" in changes:
        raw[0:8] = changes["magic"]
    struct.pack_into("<I", raw, 12, 0)
    struct.pack_into("<I", raw, 12, crc32c(bytes(raw[:HEADER_SIZE])))  # a well-formed header otherwise
    open(path, "wb").write(raw)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: rewrite_header(p, version=2), "format version 2"),
        (lambda p: rewrite_header(p, magic=b"NOTMAGIC"), "bad magic"),
        (lambda p: os.truncate(p, HEADER_SIZE + ALIGN), "truncated payload"),
        (lambda p: os.truncate(p, 100), "truncated header"),
    ],
    ids=["wrong-version", "bad-magic", "truncated-payload", "truncated-header"],
)
def test_damaged_files_are_rejected(tmp_path, io, damage, message):
    path = str(tmp_path / "c")
    io.write(path, *chunk(os.urandom(4 * ALIGN)))
    damage(path)
    with pytest.raises(ChunkRejected, match=message):
        io.read(path, KEY)


def test_a_file_holding_another_key_is_rejected(tmp_path, io):
    path = str(tmp_path / "c")
    io.write(path, *chunk(os.urandom(ALIGN), key="someone-else"))
    with pytest.raises(ChunkRejected, match="different cache key"):
        io.read(path, KEY)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, HEADER_SIZE + 3 * ALIGN - 1), st.integers(1, 255))
def test_any_flipped_byte_is_caught_or_harmless(tmp_path_factory, offset, flip):
    """Never wrong bytes: a flipped bit is rejected, unless it lies in padding nobody reads."""
    payload = os.urandom(2 * ALIGN + 1000)
    path = str(tmp_path_factory.mktemp("flip") / "c")
    io = PosixIO(direct=True)
    io.write(path, *chunk(payload))
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ flip]))
    try:
        _, data = io.read(path, KEY)
    except ChunkRejected:
        assert offset < HEADER_SIZE + len(payload)  # header and payload are fully covered
    else:
        assert bytes(data) == payload and offset >= HEADER_SIZE + len(payload)


def test_header_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="too long"):
        encode_header(ChunkHeader("k" * 5000, "bfloat16", (1,), "", 0, 0))
    with pytest.raises(ValueError, match="dimensions"):
        encode_header(ChunkHeader("k", "bfloat16", (1,) * 9, "", 0, 0))
    assert decode_header(encode_header(ChunkHeader("k", "int8", (), "fp", 0, 0))).key == "k"
