# SPDX-License-Identifier: Apache-2.0
"""LMCache's multiprocess mode through ``LMCachePortableConnector``: real ``lmcache server`` processes.

One story, in order (each step a new vLLM-CPU engine process, one module):

1. a *stock* server (LMCache's documented flags, its default ``lmcache_driven``
   transfers) plus our L2 adapter: the CPU worker picks the server's
   shared-memory path instead of hanging; the second pass hits;
2. vLLM restarted, same server: warm from the server's memory;
3. the server restarted as ``vllm-kvplugin server`` (``auto``: the CPU worker
   moves KV itself, ``engine_driven``) on the same directory: warm from our
   L2 adapter's files, written in the other transfer mode (same chunk bytes);
4. every file damaged (truncated, payload or header bit flipped), server
   restarted: misses, the same tokens.

Greedy tokens always equal an engine without a connector. Prompt lengths are
off the server's 256-token chunk grid; the block size (64) is not vLLM-CPU's
default.
"""

import random

import pytest

from tests.e2e.engines import run_engine
from tests.e2e.llm_runner import damage_every_chunk_file
from vllm_kvplugin.mp.server import ServerProcess

pytestmark = pytest.mark.e2e

CHUNK = 256
LENGTHS = (600, 1100)
WHOLE_CHUNKS = [n // CHUNK * CHUNK for n in LENGTHS]


def mp_connector(server: ServerProcess) -> dict:
    """The README's MP configuration: our connector name with LMCache's own keys."""
    return {
        "kv_connector": "LMCachePortableConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": server.port},
    }


@pytest.fixture(scope="module")
def story(tmp_path_factory, tiny_model):
    rng = random.Random(15)
    prompts = [[1] + [rng.randrange(3, 1024) for _ in range(n - 1)] for n in LENGTHS]
    spec = {"model": tiny_model, "prompts": prompts, "block_size": 64, "max_tokens": 8}
    work = tmp_path_factory.mktemp("mp")
    l2 = work / "l2"
    out = {"baseline": run_engine(spec | {"passes": 1}, work, "baseline")}
    with ServerProcess(work, directio_path=l2, stock=True) as stock:
        out["stock"] = run_engine(spec | {"passes": 2, "kv_transfer_config": mp_connector(stock)}, work, "stock")
        out["vllm_restarted"] = run_engine(
            spec | {"passes": 1, "kv_transfer_config": mp_connector(stock)}, work, "vllm_restarted")
        out["stock_log"] = stock.log_path.read_text()
    out["files"] = sorted(p.name for p in l2.rglob("*.kvchunk"))
    with ServerProcess(work, directio_path=l2) as ours:
        out["server_restarted"] = run_engine(
            spec | {"passes": 1, "kv_transfer_config": mp_connector(ours)}, work, "server_restarted")
    out["damaged"] = damage_every_chunk_file(str(l2))
    with ServerProcess(work, directio_path=l2) as ours:
        out["after_damage"] = run_engine(
            spec | {"passes": 1, "kv_transfer_config": mp_connector(ours)}, work, "after_damage")
        out["damage_log"] = ours.log_path.read_text()
    out["files_after_damage"] = sorted(p.name for p in l2.rglob("*.kvchunk"))
    return out


def test_stock_server_defaults_work_through_shared_memory(story):
    base = story["baseline"]["passes"][0]["tokens"]
    cold, warm = story["stock"]["passes"]
    assert cold["cached"] == [0, 0]
    assert warm["cached"] == WHOLE_CHUNKS
    assert cold["tokens"] == warm["tokens"] == base
    assert "registering cpu KV with lmcache_driven" in story["stock"]["log"]
    assert "Supported transfer mode: lmcache_driven" in story["stock_log"]  # the server's default, unchanged


def test_restarted_vllm_is_warm_from_the_server(story):
    run = story["vllm_restarted"]["passes"][0]
    assert run["cached"] == WHOLE_CHUNKS
    assert run["tokens"] == story["baseline"]["passes"][0]["tokens"]


def test_restarted_server_is_warm_from_our_l2_files(story):
    # Every whole chunk of both prompts is a file: 2 + 4 chunks (the model has one KV rank).
    assert len(story["files"]) == sum(n // CHUNK for n in LENGTHS)
    run = story["server_restarted"]
    assert "registering cpu KV with engine_driven" in run["log"]
    assert run["passes"][0]["cached"] == WHOLE_CHUNKS
    assert run["passes"][0]["tokens"] == story["baseline"]["passes"][0]["tokens"]


def test_damaged_l2_files_are_misses_never_wrong_tokens(story):
    assert story["damaged"] == len(story["files"])
    run = story["after_damage"]["passes"][0]
    assert run["tokens"] == story["baseline"]["passes"][0]["tokens"]
    assert run["cached"] == [0, 0]
    assert "failed its checks" in story["damage_log"]
    # Each damaged file was dropped when read; the fresh store of the same chunks replaced it.
    assert len(story["files_after_damage"]) == len(story["files"])
