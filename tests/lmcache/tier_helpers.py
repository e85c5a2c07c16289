# SPDX-License-Identifier: Apache-2.0
"""The direct-I/O tier inside a real LMCacheEngine on CPU: shapes, KV, and waiting for its writer threads."""

import time
import uuid

import torch
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from kv_helpers import paged_kv, slot_mapping

from vllm_kvplugin.lmcache.directio_backend import ENGINE_KEY, PLUGIN_NAME, READ_AHEAD_KEY, plugin_config
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector
from vllm_kvplugin.storage.directory import SUFFIX

LAYERS, BLOCKS, HEADS, BLOCK, HEAD, CHUNK = 2, 16, 2, 16, 32, 32


def kv(seed=None):
    return paged_kv(LAYERS, BLOCKS, HEADS, BLOCK, HEAD, seed)


def slots(table, n):
    return slot_mapping(table, n, BLOCK)


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


def make_engine(directory, local_cpu=False, max_size_gb=0.5, io_engine=None, read_ahead=None):
    """(engine id, engine) of an LMCacheEngine whose only storage tier is the direct-I/O one in ``directory``
    (``io_engine``, ``read_ahead``: ``kvplugin.directio.engine``/``.read_ahead``, unset by default)."""
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, local_cpu=local_cpu, max_local_cpu_size=0.05)
    tier = plugin_config(str(directory), max_size_gb)
    cfg.storage_plugins = tier["storage_plugins"]
    cfg.extra_config = (tier["extra_config"] | ({ENGINE_KEY: io_engine} if io_engine else {})
                        | ({READ_AHEAD_KEY: read_ahead} if read_ahead else {}))
    md = LMCacheMetadata(
        model_name="m@kvplugin1/test", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.bfloat16, kv_shape=(LAYERS, 2, CHUNK, HEADS, HEAD), role="worker", chunk_size=CHUNK,
    )
    engine_id = f"dio-{uuid.uuid4()}"
    engine = LMCacheEngineBuilder.get_or_create(
        engine_id, cfg, md, PortableGPUConnector(md, BLOCK), lambda t, s: t, lambda o, s: o
    )
    engine.post_init()
    return engine_id, engine
