# SPDX-License-Identifier: Apache-2.0
"""Ways a stored chunk is damaged (a file on disk, a value in a shared store), shared by the tiers' tests."""

import os

import pytest

from vllm_kvplugin.storage.format import ALIGN, HEADER_SIZE


def flip(path, offset: int) -> None:
    """Invert one byte of ``path`` at ``offset``."""
    with open(path, "r+b") as f:
        byte = os.pread(f.fileno(), 1, offset)[0]
        os.pwrite(f.fileno(), bytes([byte ^ 0xFF]), offset)


# (damage(path), the ChunkRejected message it must give) for a file holding a 4-block payload
DAMAGES = [
    pytest.param(lambda p: os.truncate(p, HEADER_SIZE + ALIGN), "truncated payload", id="truncated-payload"),
    pytest.param(lambda p: os.truncate(p, 100), "truncated header", id="truncated-header"),
    pytest.param(lambda p: flip(p, HEADER_SIZE + 10), "payload checksum", id="flipped-payload"),
    pytest.param(lambda p: flip(p, 20), "header checksum", id="flipped-header"),
]


# How a shared store's value goes bad: each must be a miss, and be deleted
VALUE_DAMAGES = ["flip-payload", "flip-header", "truncate", "another-key"]


def damaged_value(value: bytes, damage: str, another: bytes) -> bytes:
    """``value`` damaged as ``damage`` says (``another``: a different chunk's value)."""
    out = bytearray(value)
    if damage == "flip-payload":
        out[-3] ^= 0xFF
    elif damage == "flip-header":
        out[40] ^= 0xFF
    elif damage == "truncate":
        out = out[: len(out) // 2]
    else:
        out = bytearray(another)
    return bytes(out)
