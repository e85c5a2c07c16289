# SPDX-License-Identifier: Apache-2.0
"""vLLM's real OpenAI server with LMCachePortableConnector, over HTTP on loopback."""

import json
import random
import urllib.request

import pytest

from tests.e2e.engines import engine_env
from vllm_kvplugin.demo.model import random_prompt
from vllm_kvplugin.demo.server import VllmServer

pytestmark = pytest.mark.e2e

CONNECTOR = {
    "kv_connector": "LMCachePortableConnector",
    "kv_role": "kv_both",
    "kv_connector_extra_config": {"lmcache.chunk_size": 64, "lmcache.max_local_cpu_size": 0.2},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    with VllmServer(tiny_model, CONNECTOR, log, env=engine_env()) as srv:
        yield srv


def test_server_lists_the_model_and_completes(server):
    with urllib.request.urlopen(server.base_url + "/v1/models", timeout=10) as r:
        assert [m["id"] for m in json.load(r)["data"]] == [server.model]
    out = server.complete("w1 w2 w3 w4", max_tokens=4)
    assert out.text.split() and all(w.startswith("w") for w in out.text.split())


def test_repeated_long_prompt_reports_cached_tokens_from_the_connector(server):
    prompt = random_prompt(900, random.Random(1))  # 901 tokens with BOS: 14 whole chunks of 64
    cold = server.complete(prompt, max_tokens=8)
    warm = server.complete(prompt, max_tokens=8)
    assert cold.prompt_tokens == 901 and cold.cached_tokens == 0
    assert warm.cached_tokens == 896  # vLLM's own prefix cache is off: these came from LMCache
    assert warm.text == cold.text
