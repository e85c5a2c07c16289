# SPDX-License-Identifier: Apache-2.0
"""A restarted vLLM-CPU engine warms its first request from the direct-I/O tier alone."""

import random

import pytest

from tests.e2e.engines import run_engine

pytestmark = pytest.mark.e2e

LENGTHS = (300, 650)


def test_restarted_engine_loads_kv_written_by_its_predecessor(tmp_path_factory, tiny_model):
    rng = random.Random(7)
    prompts = [[1] + [rng.randrange(3, 1024) for _ in range(n - 1)] for n in LENGTHS]
    directory = tmp_path_factory.mktemp("directio")
    kv = {
        "kv_connector": "LMCachePortableConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "lmcache.chunk_size": 64,
            "lmcache.local_cpu": False,  # hits can only come from the files
            "lmcache.max_local_cpu_size": 0.2,
            "kvplugin.directio.path": str(directory),
            "kvplugin.directio.max_size_gb": 0.5,
        },
    }
    spec = {"model": tiny_model, "prompts": prompts, "passes": 1, "kv_transfer_config": kv}
    first = run_engine(spec, tmp_path_factory.mktemp("first"), "first")
    assert first["passes"][0]["cached"] == [0, 0]
    assert "posix-odirect" in first["log"]
    second = run_engine(spec, tmp_path_factory.mktemp("second"), "second")
    assert second["passes"][0]["cached"] == [n // 64 * 64 for n in LENGTHS]
    assert second["passes"][0]["tokens"] == first["passes"][0]["tokens"]
