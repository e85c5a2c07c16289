# SPDX-License-Identifier: Apache-2.0
"""Fixtures for LMCache-level tests (in-process engines, no vLLM engine)."""

import pytest
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from tier_helpers import make_engine


@pytest.fixture
def engines():
    """``engines(directory, local_cpu=False, max_size_gb=0.5)``: an LMCacheEngine whose only tier is the
    direct-I/O one in ``directory``; all are destroyed after the test."""
    made = []

    def make(*args, **kwargs):
        engine_id, engine = make_engine(*args, **kwargs)
        made.append(engine_id)
        return engine

    yield make
    for engine_id in made:
        LMCacheEngineBuilder.destroy(engine_id)
