# SPDX-License-Identifier: Apache-2.0
"""What a local user, a crafted key or a crafted file can do to the chunk store: nothing.

Files are 0600 and directories the tier creates 0700 (an existing directory
keeps its mode: it may be group-shared on purpose); a key never becomes a path
except through SHA-256; stored bytes are parsed with ``struct`` only, never
unpickled; and a header's claims are bounded before anything is allocated.
"""

import ast
import os
import struct
from pathlib import Path

import pytest

import vllm_kvplugin
from vllm_kvplugin.storage.directory import SUFFIX, ChunkDirectory
from vllm_kvplugin.storage.format import (
    HEADER_SIZE, MAX_PAYLOAD, ChunkHeader, ChunkRejected, crc32c, decode_header, encode_header,
)
from vllm_kvplugin.storage.io import PosixIO

PACKAGE = Path(vllm_kvplugin.__file__).parent
STORED_BYTES_PATH = [*(PACKAGE / "storage").glob("*.py"), PACKAGE / "lmcache" / "directio_backend.py"]


@pytest.fixture
def open_umask():
    """Umask 0, so the modes the tier asks for are the modes it gets (a umask would hide a missing mode)."""
    old = os.umask(0)
    yield
    os.umask(old)


def write_chunk(directory: ChunkDirectory, key: str) -> str:
    path = directory.path_for(key)
    directory.make_dirs_for(path)
    payload = os.urandom(100)
    PosixIO(direct=False).write(path, encode_header(ChunkHeader(key, "int8", (100,), "", 100, crc32c(payload))),
                                payload)
    return path


def test_tier_creates_0700_directories_and_0600_files(tmp_path, open_umask):
    root = tmp_path / "a" / "tier"
    directory = ChunkDirectory(str(root), 10**6)
    path = write_chunk(directory, "k")
    assert root.stat().st_mode & 0o777 == 0o700
    assert Path(path).parent.stat().st_mode & 0o777 == 0o700
    assert Path(path).stat().st_mode & 0o777 == 0o600


def test_an_existing_shared_directory_keeps_its_mode(tmp_path, open_umask):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o2770)  # group-shared between service accounts, setgid
    path = write_chunk(ChunkDirectory(str(root), 10**6), "k")
    assert root.stat().st_mode & 0o7777 == 0o2770
    assert Path(path).parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("key", ["../../../etc/passwd", "/etc/shadow", "a/../../b", "..", "x\0y", "\u202e" * 300])
def test_keys_never_become_paths(tmp_path, key):
    directory = ChunkDirectory(str(tmp_path), 10**6)
    path = Path(write_chunk(directory, key))
    assert path.resolve().parent.parent == tmp_path.resolve()
    assert len(path.name) == 64 + len(SUFFIX) and path.parent.name == path.name[:2]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [path]


def imported_modules(source: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def called_names(source: Path) -> set[str]:
    calls = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call):
            calls.add(ast.unparse(node.func))
    return calls


@pytest.mark.parametrize("source", STORED_BYTES_PATH, ids=lambda p: p.name)
def test_no_deserializer_that_runs_code_reads_stored_bytes(source):
    assert not imported_modules(source) & {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "yaml"}
    assert not called_names(source) & {"torch.load", "eval", "exec", "pickle.loads", "numpy.load", "np.load"}


def test_the_format_decodes_with_struct_only():
    assert imported_modules(PACKAGE / "storage" / "format.py") == {
        "__future__", "struct", "dataclasses", "crc32c"}


def crafted(ndim=1, payload_len=100, shape=(100,)):
    """A header with a valid checksum that claims whatever it is told to."""
    raw = bytearray(encode_header(ChunkHeader("k", "int8", (1,), "", 0, 0)))
    struct.pack_into("<QIII", raw, 16, payload_len, 0, ndim, 0)
    struct.pack_into(f"<{len(shape)}Q", raw, 32, *shape)
    struct.pack_into("<I", raw, 12, 0)
    struct.pack_into("<I", raw, 12, crc32c(bytes(raw)))
    return bytes(raw)


@pytest.mark.parametrize("raw, message", [
    (crafted(payload_len=1 << 40), f"payload length {1 << 40} exceeds {MAX_PAYLOAD}"),
    (crafted(payload_len=2**64 - 1), "exceeds"),
    (crafted(ndim=100), "bad ndim 100"),
], ids=["1TiB", "u64-max", "100-dims"])
def test_absurd_headers_are_rejected(raw, message):
    with pytest.raises(ChunkRejected, match=message):
        decode_header(raw)


def test_a_claimed_length_beyond_the_file_allocates_nothing(tmp_path):
    """1 GiB claimed, 4 KiB present: rejected before a buffer is sized by the claim."""
    path = tmp_path / "c"
    path.write_bytes(crafted(payload_len=1 << 30))
    io = PosixIO(direct=True)
    with pytest.raises(ChunkRejected, match="file shorter than the 1073741824 bytes claimed"):
        io.read(str(path), "k")
    assert len(io._staging.buf) == HEADER_SIZE
