# SPDX-License-Identifier: Apache-2.0
"""Tensor parallel 2 on vLLM-CPU: each rank stores and loads its own shard through LMCache.

vLLM-CPU runs TP=2 on two cores only with one core pinned per worker
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``). LMCache keys carry the rank and world
size, so the two ranks' shards never mix, and a TP=1 engine on the same
persistent store never reads a TP=2 shard as its whole KV. In LMCache's MP
mode both ranks' workers register with one ``lmcache server`` and move their
shards through our device plugin.
"""

import random

import pytest

from tests.e2e.engines import run_engine, stored_chunks, warm_hit
from vllm_kvplugin.mp.server import DEFAULT_CHUNK_SIZE as CHUNK
from vllm_kvplugin.mp.server import ServerProcess

pytestmark = pytest.mark.e2e

LENGTHS = (333, 700)
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def prompts():
    rng = random.Random(0)
    return [[1] + [rng.randrange(3, 1024) for _ in range(n - 1)] for n in LENGTHS]


@pytest.fixture(scope="module")
def tp2_runs(tmp_path_factory, tiny_model, store):
    spec = {"model": tiny_model, "prompts": prompts(), "passes": 2, "tensor_parallel_size": 2}
    base = run_engine(spec, tmp_path_factory.mktemp("tp2-base"), "tp2-base", **TP_ENV)
    cached = run_engine(spec | {"kv_transfer_config": connector(store)}, tmp_path_factory.mktemp("tp2-kv"), "tp2-kv", **TP_ENV)
    return base, cached


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A direct-I/O tier directory both TP=2 and, afterwards, TP=1 use."""
    return tmp_path_factory.mktemp("shared-store")


def connector(store) -> dict:
    return {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"lmcache.chunk_size": 64, "lmcache.max_local_cpu_size": 0.2,
                                          "kvplugin.directio.path": str(store), "kvplugin.directio.max_size_gb": 0.2}}


def test_tp2_hits_on_both_ranks_with_unchanged_greedy_tokens(tp2_runs):
    base, cached = tp2_runs
    want = base["passes"][0]["tokens"]
    assert cached["passes"][0]["tokens"] == want
    assert cached["passes"][1]["tokens"] == want
    assert cached["passes"][1]["cached"] == [warm_hit(n) for n in LENGTHS]
    # Both workers built a portable engine of their own (one per rank).
    assert cached["log"].count("LMCache engine built with the portable KV mover") == 2


def test_tp1_engine_on_the_same_store_gets_no_hits_from_tp2_shards(tp2_runs, store, tmp_path_factory, tiny_model):
    shards = set(store.rglob("*.kvchunk"))
    assert len(shards) == 2 * sum(stored_chunks(n, 64) for n in LENGTHS)  # one file per chunk per rank
    spec = {"model": tiny_model, "prompts": prompts(), "passes": 1, "kv_transfer_config": connector(store)}
    tp1 = run_engine(spec, tmp_path_factory.mktemp("tp1-kv"), "tp1-kv")
    assert tp1["passes"][0]["cached"] == [0, 0]
    assert "discarding a bad chunk file" not in tp1["log"]
    assert shards < set(store.rglob("*.kvchunk"))  # it wrote whole-KV chunks of its own beside them


def test_tp2_in_mp_mode_hits_whole_chunks_on_both_ranks_with_unchanged_greedy_tokens(tp2_runs, tmp_path_factory,
                                                                                   tiny_model):
    base, _ = tp2_runs
    work = tmp_path_factory.mktemp("tp2-mp")
    spec = {"model": tiny_model, "prompts": prompts(), "passes": 2, "tensor_parallel_size": 2}
    with ServerProcess(work, directio_path=work / "l2") as server:  # vllm-kvplugin server's chunk size
        kv = {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": server.port}}
        mp = run_engine(spec | {"kv_transfer_config": kv}, work, "tp2-mp", **TP_ENV)
    cold, warm = mp["passes"]
    assert cold["tokens"] == warm["tokens"] == base["passes"][0]["tokens"]
    assert cold["cached"] == [0, 0] and warm["cached"] == [n // CHUNK * CHUNK for n in LENGTHS]
    assert len(list((work / "l2").rglob("*.kvchunk"))) == 2 * sum(n // CHUNK for n in LENGTHS)  # each rank's shard
