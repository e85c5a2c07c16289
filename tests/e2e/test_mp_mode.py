# SPDX-License-Identifier: Apache-2.0
"""LMCache's multiprocess mode through ``LMCachePortableConnector``: real ``lmcache server`` processes.

One story, in order (each step a new vLLM-CPU engine process, one module):

1. a *stock* server (LMCache's documented flags, its default ``lmcache_driven``
   transfers) plus our L2 adapter: the CPU worker picks the server's
   shared-memory path instead of hanging; the second pass hits;
2. vLLM restarted, same server: warm from the server's memory; a
   ``kv_producer`` on that server never loads;
3. the server restarted as ``vllm-kvplugin server`` (``auto``: the CPU worker
   moves KV itself, ``engine_driven``, through our device plugin) on the same
   directory: warm from our L2 adapter's files, which the stock server's own
   copy wrote in the other transfer mode (same chunk bytes, same tokens);
4. every file damaged (truncated, payload or header bit flipped), server
   restarted: misses, the same tokens.

Greedy tokens always equal an engine without a connector. Prompt lengths are
off the server's 256-token chunk grid; the block size (64) is not vLLM-CPU's
default. Our servers here use the stock server's chunk size (LMCache's 256,
not ``vllm-kvplugin server``'s 128) because they read the L2 files it wrote.
"""

import json
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.engines import run_engine
from tests.e2e.llm_runner import damage_every_chunk_file
from tests.vllm.example_configs import load_example
from tests.e2e.engines import RUNNER, engine_env
from vllm_kvplugin import doctor
from vllm_kvplugin.demo.server import free_port
from vllm_kvplugin.mp.server import ServerProcess
from vllm_kvplugin.mp.server_probe import ServerUnavailable, ask, choose_transfer_mode

pytestmark = pytest.mark.e2e

CHUNK = 256  # LMCache's default: the stock server's
LENGTHS = (600, 1100)
WHOLE_CHUNKS = [n // CHUNK * CHUNK for n in LENGTHS]


def mp_connector(server: ServerProcess) -> dict:
    """examples/mp-server.json (our connector name with LMCache's own keys), at this server's port."""
    kv = load_example("mp-server.json")
    kv["kv_connector_extra_config"]["lmcache.mp.port"] = server.port
    return kv


@pytest.fixture(scope="module")
def story(tmp_path_factory, tiny_model):
    rng = random.Random(15)
    prompts = [[1] + [rng.randrange(3, 1024) for _ in range(n - 1)] for n in LENGTHS]
    spec = {"model": tiny_model, "prompts": prompts, "block_size": 64, "max_tokens": 8}
    work = tmp_path_factory.mktemp("mp")
    l2 = work / "l2"
    stock = ServerProcess(work, directio_path=l2, stock=True)
    try:
        with ThreadPoolExecutor(1) as starting:  # the server starts while the baseline engine runs
            ready = starting.submit(stock.start)
            out = {"baseline": run_engine(spec | {"passes": 1}, work, "baseline")}
            ready.result()
    except BaseException:
        stock.stop()
        raise
    with stock:
        started = time.monotonic()
        out["stock_answer"] = ask(stock.url, 5.0)
        out["probe_s"] = time.monotonic() - started
        out["doctor"] = doctor.diagnose(json.dumps(mp_connector(stock)))
        out["stock"] = run_engine(spec | {"passes": 2, "kv_transfer_config": mp_connector(stock)}, work, "stock")
        out["vllm_restarted"] = run_engine(
            spec | {"passes": 1, "kv_transfer_config": mp_connector(stock)}, work, "vllm_restarted")
        producer = mp_connector(stock) | {"kv_role": "kv_producer"}
        out["producer"] = run_engine(spec | {"passes": 2, "kv_transfer_config": producer}, work, "producer")
        out["stock_log"] = stock.log_path.read_text()
    out["files"] = sorted(p.name for p in l2.rglob("*.kvchunk"))
    with ServerProcess(work, directio_path=l2, chunk_size=CHUNK) as ours:
        out["server_restarted"] = run_engine(
            spec | {"passes": 1, "kv_transfer_config": mp_connector(ours)}, work, "server_restarted")
    out["damaged"] = damage_every_chunk_file(str(l2))
    with ServerProcess(work, directio_path=l2, chunk_size=CHUNK) as ours:
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


def test_a_stock_server_is_probed_in_seconds_and_hpu_gets_the_fix(story):
    answer = story["stock_answer"]
    assert answer.transfer_modes == {"lmcache_driven"}
    assert story["probe_s"] < 30
    with pytest.raises(ServerUnavailable, match="--supported-transfer-mode auto"):
        choose_transfer_mode(answer, "hpu", None)  # Gaudi workers only move KV themselves
    server = [f for f in story["doctor"] if f.check.startswith("lmcache server")]
    assert [f.level for f in server] == ["ok"]
    assert "cpu workers will register with lmcache_driven" in server[0].message


def test_restarted_vllm_is_warm_from_the_server(story):
    run = story["vllm_restarted"]["passes"][0]
    assert run["cached"] == WHOLE_CHUNKS
    assert run["tokens"] == story["baseline"]["passes"][0]["tokens"]


def test_a_producer_never_loads_even_what_the_server_holds(story):
    passes = story["producer"]["passes"]
    assert [p["cached"] for p in passes] == [[0, 0], [0, 0]]  # LMCache's MP connector alone would load
    assert all(p["tokens"] == story["baseline"]["passes"][0]["tokens"] for p in passes)


def test_restarted_server_is_warm_from_our_l2_files(story):
    # Every whole chunk of both prompts is a file: 2 + 4 chunks (the model has one KV rank).
    assert len(story["files"]) == sum(n // CHUNK for n in LENGTHS)
    run = story["server_restarted"]
    assert "registering cpu KV with engine_driven" in run["log"]
    assert "through kvplugin_cpu" in run["log"]  # our device plugin loads what LMCache's copy stored
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


def test_vllm_fails_in_seconds_when_no_server_answers(tmp_path, tiny_model):
    """LMCache alone waits 300 s for the server, then dies; ours stops startup within seconds, naming the fix."""
    kv = {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both",
          "kv_connector_extra_config": {"lmcache.mp.port": free_port(), "kvplugin.mp.probe_timeout_s": 2}}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": tiny_model, "prompts": [[1, 2, 3]], "kv_transfer_config": kv}))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(RUNNER), str(spec), str(tmp_path / "out.json")], cwd=tmp_path,
                          env=engine_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "no LMCache server answered" in proc.stdout + proc.stderr
    assert time.monotonic() - started < 120  # engine start included; LMCache alone: > 300 s
