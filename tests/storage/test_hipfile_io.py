# SPDX-License-Identifier: Apache-2.0
"""The hipFile engine and the engine choice on real files, with a fake only at the ``hipfile`` binding boundary.

The fake (``fake_hipfile.py``) does real I/O on real files; CPU memory stands in for device memory.
"""

import os
import subprocess
import sys
import types

import pytest
import torch

from vllm_kvplugin.storage import hipfile_io
from vllm_kvplugin.storage import select as select_module
from vllm_kvplugin.storage.format import ALIGN, HEADER_SIZE, ChunkHeader, ChunkRejected, aligned, crc32c, encode_header
from vllm_kvplugin.storage.hipfile_io import HipFileIO, filesystem_magic
from vllm_kvplugin.storage.io import PosixIO
from vllm_kvplugin.storage.select import select_io
from tests.storage.damaged_chunks import DAMAGES
from tests.storage.fake_hipfile import HipFileException, fake_hipfile

KEY = "model@kvplugin1/rocm/LBHNC/bs16@1@0@c0ffee@bfloat16"


@pytest.fixture
def hf(monkeypatch):
    module = fake_hipfile()
    monkeypatch.setitem(sys.modules, "hipfile", module)
    return module


@pytest.fixture
def io(hf):
    engine = HipFileIO(hf, torch.device("cpu"))  # CPU memory stands in for device memory
    yield engine
    engine.close()


def chunk(payload: bytes, key: str = KEY) -> tuple[bytes, bytes]:
    header = ChunkHeader(key, "bfloat16", (2, 4, 16, 64), "kvplugin1/rocm/LBHNC/bs16", len(payload), crc32c(payload))
    return encode_header(header), payload


def test_round_trip_is_exact_through_real_files(tmp_path, io, hf):
    payload = os.urandom(5 * ALIGN + 321)
    path = str(tmp_path / "c")
    io.write(path, *chunk(payload))
    header, data = io.read(path, KEY)
    assert bytes(data) == payload and header.shape == (2, 4, 16, 64)
    assert os.listdir(tmp_path) == ["c"] and os.stat(path).st_mode & 0o777 == 0o600
    assert os.path.getsize(path) == HEADER_SIZE + aligned(len(payload))
    assert {op for op, *_ in hf.calls} == {"write", "read"}  # the payload went through hipFile both ways


def test_files_are_byte_identical_to_posix_io_and_readable_both_ways(tmp_path, io):
    payload = os.urandom(3 * ALIGN + 77)
    ours, theirs = str(tmp_path / "hipfile"), str(tmp_path / "posix")
    posix = PosixIO(direct=True)
    io.write(ours, *chunk(payload))
    posix.write(theirs, *chunk(payload))
    assert open(ours, "rb").read() == open(theirs, "rb").read()
    assert bytes(posix.read(ours, KEY)[1]) == payload and bytes(io.read(theirs, KEY)[1]) == payload


def test_a_device_region_is_written_in_place(tmp_path, io, hf):
    values = torch.randn(3, 1000).to(torch.bfloat16)
    region = io.region(values.numel() * 2)
    region.copy_(values.view(-1).view(torch.uint8))  # a producer filling the device buffer directly
    io.write(str(tmp_path / "c"), *chunk(bytes(values.view(torch.uint8).numpy())))
    raw = bytes(PosixIO(direct=False).read(str(tmp_path / "c"), KEY)[1])
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).view(3, 1000), values)
    assert {ptr for _, ptr, *_ in hf.calls} == {region.data_ptr()}


def test_every_transfer_is_aligned(tmp_path, io, hf):
    for n in (1, ALIGN - 1, ALIGN, 7 * ALIGN + 5):
        io.write(str(tmp_path / f"c{n}"), *chunk(os.urandom(n)))
        io.read(str(tmp_path / f"c{n}"), KEY)
    assert len(hf.calls) == 8
    for op, ptr, size, file_offset, buffer_offset in hf.calls:
        assert (ptr + buffer_offset) % ALIGN == 0  # the fake also refused unregistered buffers
        assert size % ALIGN == 0 and file_offset % ALIGN == 0 and file_offset >= HEADER_SIZE


def test_staging_buffers_are_registered_once_reused_and_released(tmp_path, io, hf):
    for i in range(5):
        io.write(str(tmp_path / f"c{i}"), *chunk(os.urandom(4 * ALIGN)))
        io.read(str(tmp_path / f"c{i}"), KEY)
    assert hf.registrations == 1 and len({ptr for _, ptr, *_ in hf.calls}) == 1
    io.write(str(tmp_path / "big"), *chunk(os.urandom(9 * ALIGN)))  # grows: one new registration
    assert hf.registrations == 2 and len(hf.registered) == 1
    io.close()
    assert hf.registered == {} and hf.opened == 0


@pytest.mark.parametrize("engine_max, binding_max", [(3 * ALIGN, 1 << 31), (1 << 31, 2 * ALIGN)],
                         ids=["split-by-engine", "truncated-by-hipfile"])
def test_large_payloads_move_in_pieces(tmp_path, io, hf, engine_max, binding_max):
    io.max_io, hf.max_io = engine_max, binding_max  # scaled down from 2 GiB - 4 KiB
    payload = os.urandom(10 * ALIGN + 5)
    io.write(str(tmp_path / "c"), *chunk(payload))
    assert bytes(io.read(str(tmp_path / "c"), KEY)[1]) == payload
    limit = min(engine_max, binding_max)
    pieces = [(size, file_offset, offset) for op, _, size, file_offset, offset in hf.calls if op == "write"]
    assert len(pieces) == -(-11 * ALIGN // limit)
    assert [offset for _, _, offset in pieces] == list(range(0, 11 * ALIGN, limit))
    assert all(file_offset == HEADER_SIZE + offset for _, file_offset, offset in pieces)


@pytest.mark.parametrize("damage, message", DAMAGES)
def test_damaged_files_are_rejected(tmp_path, io, damage, message):
    path = str(tmp_path / "c")
    io.write(path, *chunk(os.urandom(4 * ALIGN)))
    damage(path)
    with pytest.raises(ChunkRejected, match=message):
        io.read(path, KEY)


def test_hipfile_errors_surface_as_os_errors_and_leave_no_file(tmp_path, io, hf, monkeypatch):
    io.write(str(tmp_path / "c"), *chunk(os.urandom(ALIGN)))
    monkeypatch.setattr(hf, "registered", {})  # the driver forgot our buffer: every transfer fails
    with pytest.raises(OSError, match="hipFile write failed"):
        io.write(str(tmp_path / "d"), *chunk(os.urandom(ALIGN)))
    with pytest.raises(OSError, match="hipFile read failed"):
        io.read(str(tmp_path / "c"), KEY)
    assert os.listdir(tmp_path) == ["c"]


def test_the_fake_refuses_misaligned_direct_io(tmp_path, hf):
    """The alignment assertions above can fail: the binding stand-in enforces what hipFile does."""
    memory = torch.empty(3 * ALIGN, dtype=torch.uint8)
    buffer = hf.Buffer(memory.data_ptr(), 3 * ALIGN, 0)
    buffer.register()
    first_aligned = -memory.data_ptr() % ALIGN
    with hf.Driver(), hf.FileHandle(str(tmp_path / "f"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600) as handle:
        assert handle.write(buffer, ALIGN, 0, first_aligned) == ALIGN
        for size, file_offset, skew in [(100, 0, 0), (ALIGN, 10, 0), (ALIGN, 0, 1)]:
            with pytest.raises(HipFileException):
                handle.write(buffer, size, file_offset, first_aligned + skew)


# -- choosing the engine -------------------------------------------------------


def test_without_the_bindings_o_direct_is_chosen_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hipfile", None)  # import hipfile raises ImportError
    engine, choice = select_io(str(tmp_path), chunks_on_device=True)
    assert isinstance(engine, PosixIO) and engine.direct and choice.engine == "posix-odirect"
    assert choice.reason.startswith("hipFile unavailable: the hipfile bindings do not import")
    assert "vllm-kvplugin[rocm]" in choice.reason and choice.reason.endswith("using O_DIRECT")


def test_the_placeholder_wheel_is_not_mistaken_for_the_bindings(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hipfile", types.SimpleNamespace(hello=lambda: "hi"))
    engine, choice = select_io(str(tmp_path), chunks_on_device=True)
    assert engine.name == "posix-odirect" and "lacks Driver, FileHandle, Buffer" in choice.reason


@pytest.mark.skipif(bool(torch.version.hip), reason="this torch is a ROCm build")
def test_bindings_without_rocm_fall_back_to_o_direct(tmp_path, hf):
    engine, choice = select_io(str(tmp_path), chunks_on_device=True)
    assert engine.name == "posix-odirect" and "not a ROCm build" in choice.reason and hf.opened == 0


@pytest.fixture
def pretend_rocm(monkeypatch, hf):
    monkeypatch.setattr(hipfile_io, "rocm_device", lambda: torch.device("cpu"))
    return hf


def test_bindings_and_rocm_on_ext4_or_xfs_choose_hipfile(tmp_path, pretend_rocm, caplog):
    if filesystem_magic(str(tmp_path)) not in (0xEF53, 0x58465342):
        pytest.skip("tmp_path is not on ext4 or xfs")
    with caplog.at_level("INFO", logger="vllm_kvplugin.storage.select"):
        engine, choice = select_io(str(tmp_path), chunks_on_device=True)
        select_io(str(tmp_path), chunks_on_device=True)
    assert isinstance(engine, HipFileIO) and choice.engine == "hipfile" and engine.reason == choice.reason
    assert pretend_rocm.calls and os.listdir(tmp_path) == []  # probed with one block, probe removed
    assert [r.getMessage() for r in caplog.records].count(f"chunk files: hipfile ({choice.reason})") == 1
    payload = os.urandom(2 * ALIGN + 9)
    engine.write(str(tmp_path / "c"), *chunk(payload))
    assert bytes(PosixIO(direct=True).read(str(tmp_path / "c"), KEY)[1]) == payload


@pytest.mark.parametrize("override, expected",
                         [(None, "posix-odirect"), ("false", "posix-odirect"), ("true", "hipfile")])
def test_other_filesystems_need_hipfiles_override(tmp_path, pretend_rocm, monkeypatch, override, expected):
    monkeypatch.setattr(hipfile_io, "filesystem_magic", lambda path: 0x01021994)  # tmpfs
    if override is not None:
        monkeypatch.setenv("HIPFILE_UNSUPPORTED_FILE_SYSTEMS", override)
    else:
        monkeypatch.delenv("HIPFILE_UNSUPPORTED_FILE_SYSTEMS", raising=False)
    engine, choice = select_io(str(tmp_path), chunks_on_device=True)
    assert engine.name == expected and "0x1021994" in choice.reason


def test_a_failing_driver_falls_back_and_releases_everything(tmp_path, pretend_rocm, monkeypatch):
    monkeypatch.setattr(pretend_rocm, "max_io", 0)  # every transfer moves nothing: the probe fails
    engine, choice = select_io(str(tmp_path), chunks_on_device=True)
    assert engine.name == "posix-odirect" and "probe write failed" in choice.reason
    assert pretend_rocm.registered == {} and pretend_rocm.opened == 0 and os.listdir(tmp_path) == []


def test_without_o_direct_buffered_io_is_chosen_even_with_hipfile(tmp_path, pretend_rocm, monkeypatch):
    monkeypatch.setattr(select_module, "choose_io", lambda directory: PosixIO(direct=False))
    engine, choice = select_io(str(tmp_path), chunks_on_device=True)
    assert engine.name == "posix-buffered" and "O_DIRECT unsupported" in choice.reason and pretend_rocm.opened == 0


def test_filesystem_magic_agrees_with_stat(tmp_path):
    out = subprocess.run(["stat", "-f", "-c", "%t", str(tmp_path)], capture_output=True, text=True, check=True)
    assert filesystem_magic(str(tmp_path)) == int(out.stdout, 16)


def test_chunks_in_host_memory_keep_o_direct_even_where_hipfile_runs(tmp_path, pretend_rocm):
    if filesystem_magic(str(tmp_path)) not in (0xEF53, 0x58465342):
        pytest.skip("tmp_path is not on ext4 or xfs")
    engine, choice = select_io(str(tmp_path), chunks_on_device=False)
    assert isinstance(engine, PosixIO) and engine.direct and "staged in host memory" in choice.reason
    assert pretend_rocm.opened == 0 and pretend_rocm.registered == {}  # the probed driver was released


def test_hipfile_asked_for_is_used_even_for_host_chunks(tmp_path, pretend_rocm):
    if filesystem_magic(str(tmp_path)) not in (0xEF53, 0x58465342):
        pytest.skip("tmp_path is not on ext4 or xfs")
    engine, choice = select_io(str(tmp_path), chunks_on_device=False, engine="hipfile")
    assert isinstance(engine, HipFileIO) and "kvplugin.directio.engine=hipfile: host chunks staged" in choice.reason
    engine.close()


def test_hipfile_asked_for_without_the_bindings_falls_back_to_o_direct(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hipfile", None)
    engine, choice = select_io(str(tmp_path), chunks_on_device=False, engine="hipfile")
    assert engine.name == "posix-odirect" and choice.reason.startswith("hipFile unavailable: the hipfile bindings")
