# SPDX-License-Identifier: Apache-2.0
"""Correctness soak: 200 concurrent requests through ``vllm serve`` with the connector, against none.

Random lengths, shared prefixes and exact repeats, 8 clients at once, chunked
prefill (256-token steps), a KV budget small enough to preempt, and every
tenth request aborted after its first token (the client hangs up), with
stores running behind the forward pass (``kvplugin.save_mode: async``): the
mode whose safety rests on blocks being kept and preemptions waited for. The
greedy text of every completed request must equal the same request's text on
a server without a connector. Afterwards nothing may be leaked: vLLM's KV
cache usage is back to 0 and, read from the worker through a worker
extension, LMCache's host buffer pool and the direct-I/O tier's pins are empty.
"""

from __future__ import annotations

import json
import random
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.engines import engine_env
from vllm_kvplugin.demo.model import random_prompt
from vllm_kvplugin.demo.server import VllmServer

pytestmark = pytest.mark.e2e

REQUESTS, CLIENTS, ABORT_EVERY = 200, 8, 10
REPO = Path(__file__).resolve().parents[2]
SERVER_OPTIONS = dict(
    max_model_len=1024,
    extra_args=("--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--num-gpu-blocks-override", "48",
                "--worker-extension-cls", "tests.e2e.worker_probe.KVPluginProbe"),
)


def workload() -> list[str]:
    """Prompts of 40..700 tokens: 12 shared prefixes with random tails, a third exact repeats."""
    rng = random.Random(99)
    prefixes = [random_prompt(rng.randrange(64, 480), rng) for _ in range(12)]
    prompts: list[str] = []
    for _ in range(REQUESTS):
        if prompts and rng.random() < 0.33:
            prompts.append(rng.choice(prompts))
        else:
            tail = random_prompt(rng.randrange(40, 220), rng)
            prompts.append(f"{rng.choice(prefixes)} {tail}" if rng.random() < 0.8 else tail)
    return prompts


def abort_after_first_token(server: VllmServer, prompt: str) -> None:
    """Stream a request and hang up after its first token: vLLM aborts it."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": 64, "temperature": 0.0, "stream": True}
    req = urllib.request.Request(server.base_url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            if raw.startswith(b"data: "):
                return


def run_workload(server: VllmServer) -> dict[int, str]:
    prompts = workload()

    def send(i: int) -> tuple[int, str | None]:
        if i % ABORT_EVERY == ABORT_EVERY - 1:
            abort_after_first_token(server, prompts[i])
            return i, None
        return i, server.complete(prompts[i], max_tokens=16).text

    with ThreadPoolExecutor(CLIENTS) as pool:
        return {i: text for i, text in pool.map(send, range(REQUESTS)) if text is not None}


def metric(server: VllmServer, name: str) -> float:
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def worker_buffers(server: VllmServer) -> list[dict]:
    req = urllib.request.Request(server.base_url + "/collective_rpc", data=json.dumps({"method": "kvplugin_buffers"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["results"]


def soak_env() -> dict:
    return engine_env(VLLM_SERVER_DEV_MODE="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model):
    log = tmp_path_factory.mktemp("soak-base") / "server.log"
    with VllmServer(tiny_model, None, log, env=soak_env(), **{**SERVER_OPTIONS, "extra_args": SERVER_OPTIONS["extra_args"][:6]}) as srv:
        return run_workload(srv)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("soak-kv")
    kv = {
        "kv_connector": "LMCachePortableConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "lmcache.chunk_size": 64, "lmcache.local_cpu": False, "lmcache.max_local_cpu_size": 0.2,
            "kvplugin.directio.path": str(work / "kv"), "kvplugin.directio.max_size_gb": 0.05,
            "kvplugin.save_mode": "async",  # every other e2e test runs CPU's default, sync
        },
    }
    with VllmServer(tiny_model, kv, work / "server.log", env=soak_env(), **SERVER_OPTIONS) as srv:
        texts = run_workload(srv)
        time.sleep(2.0)  # let the tier's last asynchronous writes land
        yield texts, srv


def test_soak_tokens_equal_a_server_without_connector(baseline, cached):
    texts, server = cached
    assert len(texts) == len(baseline) == REQUESTS - REQUESTS // ABORT_EVERY
    differing = sorted(i for i in texts if texts[i] != baseline[i])
    hit_tokens = metric(server, "vllm:kvplugin_hit_tokens_total")
    preemptions = metric(server, "vllm:num_preemptions_total")
    print(f"soak: {len(texts)} completed requests compared, {len(differing)} differ; "
          f"{REQUESTS // ABORT_EVERY} aborted; hit tokens {hit_tokens:.0f}; preemptions {preemptions:.0f}")
    assert differing == []
    assert hit_tokens > 0 and preemptions > 0  # the cache served, and the KV budget forced preemption
    assert "KV stores run on a background thread" in server.log_path.read_text()  # async mode engaged


def test_soak_leaks_no_blocks_buffers_or_pins(cached):
    _, server = cached
    assert metric(server, "vllm:kv_cache_usage_perc") == 0.0
    assert metric(server, "vllm:num_requests_running") == 0.0
    assert worker_buffers(server) == [
        {"host_pool_allocated_bytes": 0, "pinned_chunk_files": 0, "unsettled_async_saves": 0}
    ]
