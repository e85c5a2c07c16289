# SPDX-License-Identifier: Apache-2.0
"""The NIXL engine (POSIX backend, O_DIRECT) and choosing it, on real files through a real ``nixl_agent``."""

import errno
import logging
import os
import sys
import threading

import pytest
import torch

from tests.storage.damaged_chunks import DAMAGES
from vllm_kvplugin.doctor import Findings
from vllm_kvplugin.doctor.tiers import check_directio
from vllm_kvplugin.storage import select as select_module
from vllm_kvplugin.storage.format import ALIGN, HEADER_SIZE, ChunkHeader, ChunkRejected, aligned, crc32c, encode_header
from vllm_kvplugin.storage.io import PosixIO
from vllm_kvplugin.storage.nixl_io import NixlIO, NixlUnavailable, load_api, open_nixl_io
from vllm_kvplugin.storage.select import select_io
from vllm_kvplugin.storage.settings import ENGINE_KEY, PATH_KEY, tier_settings

try:
    load_api()
except NixlUnavailable as e:
    pytest.skip(f"nixl is not usable here ({e})", allow_module_level=True)

KEY = "model@kvplugin1/cpu-avx2/LBHNC/bs32@1@0@c0ffee@bfloat16"


def chunk(payload: bytes, key: str = KEY) -> tuple[bytes, bytes]:
    header = ChunkHeader(key, "bfloat16", (2, 4, 256, 128), "kvplugin1/cpu-avx2/LBHNC/bs32", len(payload), crc32c(payload))
    return encode_header(header), payload


@pytest.fixture(params=["mmap", "tensor"], ids=["host-staging", "tensor-staging"])
def io(request, tmp_path):
    """NIXL's POSIX engine; ``tensor`` stages in a (CPU) torch tensor: GDS's device-staging code, run on CPU."""
    engine = open_nixl_io(str(tmp_path))
    if request.param == "tensor":
        engine = NixlIO(engine.agent, "POSIX", device=torch.device("cpu"))
    yield engine
    engine.close()


@pytest.mark.parametrize("size", [0, 1, ALIGN - 1, ALIGN, 3 * ALIGN + 123, (5 << 20) + 7])
def test_round_trip_is_byte_exact_and_leaves_only_the_file(tmp_path, io, size):
    payload = os.urandom(size)
    path = str(tmp_path / "c1")
    io.write(path, *chunk(payload))
    header, data = io.read(path, KEY)
    assert bytes(data) == payload and header.shape == (2, 4, 256, 128) and header.payload_len == size
    assert os.listdir(tmp_path) == ["c1"]  # no *.tmp, no probe file
    assert os.path.getsize(path) == HEADER_SIZE + aligned(size)
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_files_are_byte_identical_to_posix_io_and_readable_both_ways(tmp_path, io):
    payload = os.urandom(7 * ALIGN + 77)
    ours, theirs = str(tmp_path / "nixl"), str(tmp_path / "posix")
    posix = PosixIO(direct=True)
    io.write(ours, *chunk(payload))
    posix.write(theirs, *chunk(payload))
    assert open(ours, "rb").read() == open(theirs, "rb").read()
    assert bytes(posix.read(ours, KEY)[1]) == payload and bytes(io.read(theirs, KEY)[1]) == payload


@pytest.mark.parametrize("damage, message", DAMAGES)
def test_damaged_files_are_rejected_as_posix_io_rejects_them(tmp_path, io, damage, message):
    path = str(tmp_path / "c")
    io.write(path, *chunk(os.urandom(4 * ALIGN)))
    damage(path)
    with pytest.raises(ChunkRejected, match=message) as ours:
        io.read(path, KEY)
    with pytest.raises(ChunkRejected) as theirs:
        PosixIO(direct=True).read(path, KEY)
    assert str(ours.value) == str(theirs.value)


def test_a_file_holding_another_key_is_rejected(tmp_path, io):
    path = str(tmp_path / "c")
    io.write(path, *chunk(os.urandom(ALIGN), key="someone-else"))
    with pytest.raises(ChunkRejected, match="different cache key"):
        io.read(path, KEY)


def test_a_failed_transfer_is_an_os_error_and_leaves_no_temporary_file(tmp_path, io):
    io.write(str(tmp_path / "c"), *chunk(os.urandom(ALIGN)))
    io.agent.deregister_memory(io._local.region[3])  # NIXL forgets our staging buffer: every transfer fails
    with pytest.raises(OSError, match="NIXL initialize_xfer failed"):
        io.write(str(tmp_path / "d"), *chunk(os.urandom(ALIGN)))
    with pytest.raises(OSError, match="NIXL initialize_xfer failed"):
        io.read(str(tmp_path / "c"), KEY)
    assert os.listdir(tmp_path) == ["c"]
    io._registered.clear()  # already deregistered above


def test_a_transfer_that_never_finishes_is_abandoned_within_its_bound(tmp_path, io, monkeypatch):
    io.timeout_s, io.min_rate = 0.2, float("inf")
    transfer = io.agent.transfer
    monkeypatch.setattr(io.agent, "transfer", lambda handle: (transfer(handle), "PROC")[1])
    monkeypatch.setattr(io.agent, "check_xfer_state", lambda handle: "PROC")  # never reports DONE
    with pytest.raises(OSError) as failed:
        io.write(str(tmp_path / "c"), *chunk(os.urandom(4 * ALIGN)))
    assert failed.value.errno == errno.ETIMEDOUT and os.listdir(tmp_path) == []
    assert len(io._abandoned) == 1  # that staging buffer is never reused
    monkeypatch.undo()
    payload = os.urandom(4 * ALIGN)
    io.write(str(tmp_path / "c"), *chunk(payload))
    assert bytes(io.read(str(tmp_path / "c"), KEY)[1]) == payload


def test_staging_is_registered_once_per_thread_reused_and_regrown(tmp_path, io, monkeypatch):
    registered = []
    register = io.agent.register_memory
    monkeypatch.setattr(io.agent, "register_memory",
                        lambda descs, mem, **kw: registered.append(mem) or register(descs, mem, **kw))
    for i in range(4):
        io.write(str(tmp_path / f"c{i}"), *chunk(os.urandom(4 * ALIGN)))
        io.read(str(tmp_path / f"c{i}"), KEY)
    assert registered.count("DRAM") == 1 and registered.count("FILE") == 8  # files by fd, one per transfer
    io.write(str(tmp_path / "big"), *chunk(os.urandom(64 * ALIGN)))  # grows: registered again
    assert registered.count("DRAM") == 2 and len(io._registered) == 1
    io.close()
    assert io._registered == []


def test_threads_writing_and_reading_at_once_stay_byte_exact(tmp_path, io):
    """One engine (one agent, STRICT sync) shared by the tier's threads, as in the tier."""
    failures, payloads = [], {t: [os.urandom(ALIGN * (1 + (t * 7 + i) % 40) + t) for i in range(5)] for t in range(6)}

    def worker(t):
        try:
            for rnd in range(8):
                for i, payload in enumerate(payloads[t]):
                    io.write(str(tmp_path / f"t{t}-{i}"), *chunk(payload, key=f"k{t}-{i}"))
                for i, payload in enumerate(payloads[(t + rnd) % 6]):  # other threads' files too
                    try:
                        data = bytes(io.read(str(tmp_path / f"t{(t + rnd) % 6}-{i}"), f"k{(t + rnd) % 6}-{i}")[1])
                    except FileNotFoundError:
                        continue  # not written yet
                    if data != payload:
                        failures.append((t, rnd, i))
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures
    assert not list(tmp_path.glob("*.tmp")) and len(os.listdir(tmp_path)) == 30


# -- choosing the engine -------------------------------------------------------


def test_auto_is_unchanged_and_never_picks_nixl(tmp_path):
    engine, choice = select_io(str(tmp_path), chunks_on_device=False)
    assert isinstance(engine, PosixIO) and choice.engine == "posix-odirect"
    again, same = select_io(str(tmp_path), chunks_on_device=False, engine="auto")
    assert again.name == engine.name and same == choice


def test_nixl_is_chosen_when_asked_and_logged_once(tmp_path, caplog):
    select_module._announce.cache_clear()
    with caplog.at_level(logging.INFO, logger="vllm_kvplugin.storage.select"):
        engine, choice = select_io(str(tmp_path), chunks_on_device=False, engine="nixl")
        select_io(str(tmp_path), chunks_on_device=False, engine="nixl")
    assert isinstance(engine, NixlIO) and choice.engine == "nixl-posix" and os.listdir(tmp_path) == []
    assert choice.reason.startswith("NIXL POSIX backend, O_DIRECT; GDS")  # and why GDS was not picked
    assert [r.getMessage() for r in caplog.records].count(f"chunk files: nixl-posix ({choice.reason})") == 1
    payload = os.urandom(2 * ALIGN + 9)
    engine.write(str(tmp_path / "c"), *chunk(payload))
    assert bytes(PosixIO(direct=True).read(str(tmp_path / "c"), KEY)[1]) == payload


def test_posix_asked_is_o_direct_and_says_so(tmp_path):
    engine, choice = select_io(str(tmp_path), chunks_on_device=True, engine="posix")
    assert isinstance(engine, PosixIO) and engine.direct and choice.reason == f"{ENGINE_KEY}=posix: O_DIRECT"


def test_nixl_not_importable_falls_back_to_o_direct_saying_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl", None)
    monkeypatch.setitem(sys.modules, "nixl._api", None)  # import nixl._api raises ModuleNotFoundError
    engine, choice = select_io(str(tmp_path), chunks_on_device=False, engine="nixl")
    assert isinstance(engine, PosixIO) and choice.engine == "posix-odirect"
    assert choice.reason == "nixl not installed (pip install 'vllm-kvplugin[nixl]'); using O_DIRECT"


def test_a_posix_backend_that_cannot_be_created_falls_back(tmp_path, monkeypatch):
    api, bindings = load_api(), sys.modules["nixl._bindings"]

    def refuse(self, backend, params=None):
        raise bindings.nixlBackendError("NIXL_ERR_BACKEND")

    monkeypatch.setattr(api.nixl_agent, "create_backend", refuse)
    engine, choice = select_io(str(tmp_path), chunks_on_device=False, engine="nixl")
    assert engine.name == "posix-odirect" and "POSIX backend could not be created (NIXL_ERR_BACKEND)" in choice.reason


def test_without_o_direct_nixl_falls_back_to_buffered_io(tmp_path, monkeypatch):
    monkeypatch.setattr(select_module, "choose_io", lambda directory: PosixIO(direct=False))
    engine, choice = select_io(str(tmp_path), chunks_on_device=False, engine="nixl")
    assert engine.name == "posix-buffered" and "O_DIRECT unsupported" in choice.reason
    assert "nixl needs it" in choice.reason


def test_the_engine_setting_is_validated_naming_the_key(tmp_path):
    assert tier_settings({PATH_KEY: str(tmp_path)}).engine == "auto"
    assert tier_settings({PATH_KEY: str(tmp_path), ENGINE_KEY: "nixl"}).engine == "nixl"
    with pytest.raises(ValueError, match=r"kvplugin\.directio\.engine must be one of auto, posix, nixl, hipfile"):
        tier_settings({PATH_KEY: str(tmp_path), ENGINE_KEY: "gds"})


def test_doctor_shows_the_configured_engine_and_warns_when_it_fell_back(tmp_path, monkeypatch):
    found = Findings()
    check_directio(found, str(tmp_path), 0.001, "nixl")
    assert [f.level for f in found] == ["ok"] and "read back with nixl-posix (NIXL POSIX backend" in found[0].message
    monkeypatch.setitem(sys.modules, "nixl._api", None)
    found = Findings()
    check_directio(found, str(tmp_path), 0.001, "nixl")
    assert [f.level for f in found] == ["ok", "warn"] and "nixl not installed" in found[0].message
    assert f"{ENGINE_KEY}=nixl cannot run here" in found[1].message and os.listdir(tmp_path) == []
