# SPDX-License-Identifier: Apache-2.0
"""The direct-I/O tier inside a real LMCacheEngine on CPU, on real files."""

import errno
import os
import time

import pytest
import torch
from tier_helpers import (
    CHUNK, DST_TABLE, HEAD, HEADS, LAYERS, SRC_TABLE, TOKENS, assert_loaded, backend, chunk_files, kv, settle, slots,
)

from vllm_kvplugin.lmcache.settings import check_extra_config
from vllm_kvplugin.storage.io import PosixIO
from vllm_kvplugin.storage.nixl_io import NixlUnavailable, load_api
from vllm_kvplugin.storage.settings import ENGINE_KEY, PATH_KEY


def _nixl_missing() -> str:
    try:
        load_api()
    except NixlUnavailable as e:
        return str(e)
    return ""


# kvplugin.directio.engine: unset (auto: O_DIRECT POSIX here), or nixl (NIXL's POSIX backend)
IO_ENGINES = [pytest.param(None, "posix-odirect", id="auto"),
              pytest.param("nixl", "nixl-posix", id="nixl",
                           marks=pytest.mark.skipif(bool(_nixl_missing()), reason=_nixl_missing()))]


@pytest.mark.parametrize("io_engine, io_name", IO_ENGINES)
@pytest.mark.parametrize("local_cpu", [False, True], ids=["tier-alone", "behind-cpu-tier"])
def test_round_trip_through_lmcache_is_bit_exact(engines, tmp_path, local_cpu, io_engine, io_name):
    engine = engines(tmp_path, local_cpu=local_cpu, io_engine=io_engine)
    assert backend(engine).io.direct and backend(engine).io.name == io_name  # O_DIRECT on this filesystem
    src = kv(seed=1)
    engine.store(TOKENS, kvcaches=src, slot_mapping=slots(SRC_TABLE, 100))
    assert settle(engine, TOKENS, 96) == 96
    assert len(chunk_files(tmp_path)) == 3
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in chunk_files(tmp_path))
    dst = kv()
    assert int(engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=slots(DST_TABLE, 100)).sum()) == 96
    assert_loaded(src, dst)


def test_a_restarted_engine_is_warm_from_the_directory(engines, tmp_path):
    first = engines(tmp_path)
    src = kv(seed=2)
    first.store(TOKENS, kvcaches=src, slot_mapping=slots(SRC_TABLE, 100))
    settle(first, TOKENS, 96)
    second = engines(tmp_path)  # a new process would rescan the same way
    assert len(backend(second).directory._index) == 3
    dst = kv()
    assert int(second.retrieve(TOKENS, kvcaches=dst, slot_mapping=slots(DST_TABLE, 100)).sum()) == 96
    assert_loaded(src, dst)


@pytest.mark.parametrize("io_engine, io_name", IO_ENGINES)
@pytest.mark.parametrize("damage", ["flip-payload", "truncate", "flip-header"])
def test_a_bad_file_is_a_miss_and_is_removed(engines, tmp_path, damage, io_engine, io_name):
    engine = engines(tmp_path, io_engine=io_engine)
    assert backend(engine).io.name == io_name
    engine.store(TOKENS, kvcaches=kv(seed=3), slot_mapping=slots(SRC_TABLE, 100))
    settle(engine, TOKENS, 96)
    files = chunk_files(tmp_path)
    victim = max(files, key=lambda f: f.stat().st_mtime)  # the last chunk written
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[100 if damage == "flip-header" else 4096 + 10] ^= 0xFF
    victim.write_bytes(bytes(raw))
    dst = kv()
    hit = engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=slots(DST_TABLE, 100))
    assert int(hit.sum()) < 96  # never loaded: recomputed by vLLM instead
    assert not victim.exists()


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES, errno.EIO, errno.EROFS],
                         ids=["full-disk", "permission", "io-error", "read-only"])
def test_a_failed_store_skips_the_chunk_and_keeps_serving(engines, tmp_path, monkeypatch, error):
    """Injected at the I/O boundary: the tests run as root, for whom mode bits deny nothing."""
    engine = engines(tmp_path)

    def full(self, path, header, payload):
        raise OSError(error, os.strerror(error), path)

    monkeypatch.setattr(PosixIO, "write", full)
    engine.store(TOKENS, kvcaches=kv(seed=4), slot_mapping=slots(SRC_TABLE, 100))
    time.sleep(0.5)
    assert engine.lookup(TOKENS) == 0 and not chunk_files(tmp_path)
    monkeypatch.undo()
    engine.store(TOKENS, kvcaches=kv(seed=4), slot_mapping=slots(SRC_TABLE, 100))
    assert settle(engine, TOKENS, 96) == 96


def test_eviction_keeps_the_directory_under_its_budget(engines, tmp_path):
    per_file = 4096 + LAYERS * 2 * CHUNK * HEADS * HEAD * 2  # header + one chunk (bf16), 4 KiB-aligned
    engine = engines(tmp_path, max_size_gb=4 * per_file / 1e9)
    for i in range(4):  # 12 chunks through a 4-chunk budget
        tokens = torch.arange(96) + 1000 * (i + 1)
        engine.store(tokens, kvcaches=kv(seed=i), slot_mapping=slots(SRC_TABLE, 96))
        settle(engine, tokens, 96)
    sizes = [f.stat().st_size for f in chunk_files(tmp_path)]
    assert sum(sizes) <= 4 * per_file and len(sizes) == 4
    assert backend(engine).directory.evictions == 8


def test_the_engine_key_flows_from_the_connector_config_into_lmcache_and_is_validated(tmp_path):
    config = check_extra_config({PATH_KEY: str(tmp_path), ENGINE_KEY: "nixl"}, 32)
    assert config.extra_config[ENGINE_KEY] == "nixl"
    assert ENGINE_KEY not in check_extra_config({PATH_KEY: str(tmp_path)}, 32).extra_config  # auto: as before
    with pytest.raises(ValueError, match=r"kvplugin\.directio\.engine must be one of"):
        check_extra_config({PATH_KEY: str(tmp_path), ENGINE_KEY: "spdk"}, 32)
