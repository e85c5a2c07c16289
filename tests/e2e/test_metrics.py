# SPDX-License-Identifier: Apache-2.0
"""The connector's counters on vLLM's own ``/metrics`` endpoint and in its periodic log line.

A real OpenAI server with the portable connector and a small direct-I/O tier;
one prompt sent twice: the first is stored, the second served from LMCache.
"""

import random
import re
import time
import urllib.request

import pytest

from tests.e2e.engines import engine_env
from vllm_kvplugin.demo.model import random_prompt
from vllm_kvplugin.demo.server import VllmServer

pytestmark = pytest.mark.e2e

CHUNK_TOKENS, CHUNKS = 64, 14  # a 901-token prompt (900 words + BOS) holds 14 whole chunks
SAMPLE = re.compile(r'^(vllm:kvplugin_\w+)_total\{(.*)\} (\S+)$', re.M)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("metrics")
    connector = {
        "kv_connector": "LMCachePortableConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "lmcache.chunk_size": CHUNK_TOKENS, "lmcache.max_local_cpu_size": 0.2,
            # room for about 7 of the 14 chunk files (128 KiB each): the tier must evict
            "kvplugin.directio.path": str(root / "tier"), "kvplugin.directio.max_size_gb": 0.001,
        },
    }
    env = engine_env(VLLM_LOG_STATS_INTERVAL="1")
    with VllmServer(tiny_model, connector, root / "vllm-serve.log", env=env) as srv:
        prompt = random_prompt(900, random.Random(3))
        srv.cold, srv.warm = srv.complete(prompt), srv.complete(prompt)
        yield srv


def scrape(server) -> dict[str, tuple[str, float]]:
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {name: (labels, float(value)) for name, labels, value in SAMPLE.findall(text)}


def settled_metrics(server, timeout: float = 20.0) -> tuple[dict, dict[str, float]]:
    """The kvplugin counters once the warm request's load and the tier's evictions have arrived
    (stats travel with engine steps, so they may trail the responses slightly)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        values = {name.removeprefix("vllm:kvplugin_"): value for name, (_, value) in samples.items()}
        settled = values.get("hit_tokens") and values.get("directio_evictions")
        if settled or time.monotonic() > deadline:
            return samples, values
        time.sleep(0.5)


def test_hits_loads_and_stores_reach_prometheus(server):
    assert server.warm.cached_tokens == CHUNKS * CHUNK_TOKENS  # the hit really happened
    samples, values = settled_metrics(server)
    assert values["lookups"] == 2 and values["lookup_tokens"] == 2 * server.cold.prompt_tokens
    assert values["hit_tokens"] == CHUNKS * CHUNK_TOKENS
    assert values["loaded_tokens"] == values["stored_tokens"] == CHUNKS * CHUNK_TOKENS
    assert values["loaded_bytes"] > 0 and values["loaded_bytes"] == values["stored_bytes"]
    assert values["load_seconds"] > 0 and values["store_seconds"] > 0
    assert values["load_failed_blocks"] == 0
    assert values["directio_evictions"] > 0
    labels, _ = samples["vllm:kvplugin_hit_tokens"]
    assert f'model_name="{server.model}"' in labels and 'engine="0"' in labels


def test_vllm_periodic_log_line_carries_the_counters(server):
    settled_metrics(server)
    deadline = time.monotonic() + 15
    while not (lines := [l for l in server.log_tail(10**7).splitlines() if "KV Transfer metrics" in l]):
        assert time.monotonic() < deadline, "no 'KV Transfer metrics' line in the server log"
        time.sleep(0.5)
    text = "\n".join(lines)
    assert f"hit_tokens={CHUNKS * CHUNK_TOKENS}" in text
    assert re.search(r"load_gbps=(?!0\.0\b)\d", text), text
