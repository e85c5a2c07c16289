# SPDX-License-Identifier: Apache-2.0
"""Fixtures for LMCache-level tests (in-process engines, no vLLM engine)."""

import uuid

import pytest
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from tier_helpers import make_engine

from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector


@pytest.fixture
def mover_engines():
    """``mover_engines(metadata, block_size, **lmcache_config)``: an LMCacheEngine with the portable
    mover, chunk size from ``metadata``; all are destroyed after the test."""
    made = []

    def make(metadata, block_size: int, **config):
        engine_id = f"test-{uuid.uuid4()}"
        made.append(engine_id)
        engine = LMCacheEngineBuilder.get_or_create(
            engine_id, LMCacheEngineConfig.from_defaults(chunk_size=metadata.chunk_size, **config), metadata,
            PortableGPUConnector(metadata, block_size), lambda t, s: t, lambda o, s: o,
        )
        engine.post_init()
        return engine

    yield make
    for engine_id in made:
        LMCacheEngineBuilder.destroy(engine_id)


@pytest.fixture
def engines():
    """``engines(directory, local_cpu=False, max_size_gb=0.5, io_engine=None, read_ahead=None)``: an LMCacheEngine whose only
    tier is the direct-I/O one in ``directory``; all are destroyed after the test."""
    made = []

    def make(*args, **kwargs):
        engine_id, engine = make_engine(*args, **kwargs)
        made.append(engine_id)
        return engine

    yield make
    for engine_id in made:
        LMCacheEngineBuilder.destroy(engine_id)
