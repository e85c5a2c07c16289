# SPDX-License-Identifier: Apache-2.0
"""The direct-I/O tier inside a real LMCacheEngine on CPU, on real files."""

import errno
import os
import time
import uuid

import pytest
import torch
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from kv_helpers import paged_kv, slot_mapping

from vllm_kvplugin.lmcache.directio_backend import PLUGIN_NAME, plugin_config
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector
from vllm_kvplugin.storage.directory import SUFFIX
from vllm_kvplugin.storage.io import PosixIO

LAYERS, BLOCKS, HEADS, BLOCK, HEAD, CHUNK = 2, 16, 2, 16, 32, 32


def kv(seed=None):
    return paged_kv(LAYERS, BLOCKS, HEADS, BLOCK, HEAD, seed)


def slots(table, n):
    return slot_mapping(table, n, BLOCK)


@pytest.fixture
def engines():
    made = []

    def make(directory, local_cpu=False, max_size_gb=0.5):
        cfg = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, local_cpu=local_cpu, max_local_cpu_size=0.05)
        tier = plugin_config(str(directory), max_size_gb)
        cfg.storage_plugins = tier["storage_plugins"]
        cfg.extra_config = tier["extra_config"]
        md = LMCacheMetadata(
            model_name="m@kvplugin1/test", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
            kv_dtype=torch.bfloat16, kv_shape=(LAYERS, 2, CHUNK, HEADS, HEAD), role="worker", chunk_size=CHUNK,
        )
        engine_id = f"dio-{uuid.uuid4()}"
        engine = LMCacheEngineBuilder.get_or_create(
            engine_id, cfg, md, PortableGPUConnector(md, BLOCK), lambda t, s: t, lambda o, s: o
        )
        engine.post_init()
        made.append(engine_id)
        return engine

    yield make
    for engine_id in made:
        LMCacheEngineBuilder.destroy(engine_id)


def backend(engine):
    return engine.storage_manager.storage_backends[PLUGIN_NAME]


def settle(engine, tokens, expected, timeout=20.0):
    deadline = time.monotonic() + timeout
    while (hit := engine.lookup(tokens)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    while backend(engine)._pending and time.monotonic() < deadline:
        time.sleep(0.05)
    return hit


def chunk_files(directory):
    return sorted(p for p in directory.rglob("*" + SUFFIX))


TOKENS = torch.arange(100) + 7  # 3 whole chunks of 32 stored
SRC_TABLE, DST_TABLE = [3, 9, 0, 12, 5, 14, 1], [2, 4, 6, 8, 10, 11, 13]


def assert_loaded(src, dst, blocks=6):
    for s, d in zip(src, dst):
        for sb, db in zip(SRC_TABLE[:blocks], DST_TABLE[:blocks]):
            assert torch.equal(d[db].view(torch.int8), s[sb].view(torch.int8))


@pytest.mark.parametrize("local_cpu", [False, True], ids=["tier-alone", "behind-cpu-tier"])
def test_round_trip_through_lmcache_is_bit_exact(engines, tmp_path, local_cpu):
    engine = engines(tmp_path, local_cpu=local_cpu)
    assert backend(engine).io.direct  # O_DIRECT on this filesystem
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


@pytest.mark.parametrize("damage", ["flip-payload", "truncate", "flip-header"])
def test_a_bad_file_is_a_miss_and_is_removed(engines, tmp_path, damage):
    engine = engines(tmp_path)
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


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES, errno.EIO], ids=["full-disk", "permission", "io-error"])
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
