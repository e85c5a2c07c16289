# SPDX-License-Identifier: Apache-2.0
"""Disaggregated prefill/decode behind the real ``vllm-router``, through one shared direct-I/O directory.

Real processes on loopback: ``vllm-router --vllm-pd-disaggregation`` in front of a
``kv_producer`` ``vllm serve`` (asynchronous saves, and a tier whose every chunk
write is slowed on purpose to longer than a whole prefill: tests/e2e/slow_tier.py)
and a ``kv_consumer`` ``vllm serve`` started with ``examples/consumer.json``; a
third ``vllm serve`` without a connector gives the colocated answers. Prefix caching is off on every server, so the
decode server's hits can only come from the files the prefill server wrote.

Without the hand-off wait (vllm_kvplugin/lmcache/handoff.py) the router would
send each request to the decode server while its chunks were still being
written, and the decode server would recompute them.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.engines import BLOCK, all_ready, engine_env, warm_hit
from tests.e2e.slow_tier import STORE_DELAY_S
from tests.e2e.test_examples_run import scaled_example
from tests.e2e.test_metrics import scrape
from tests.vllm.example_configs import PLACEHOLDER_SHARED
from vllm_kvplugin.demo.model import random_prompt
from vllm_kvplugin.demo.router import PDRouter
from vllm_kvplugin.demo.server import VllmServer

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHUNK = 256  # examples/consumer.json's
PREFIX_WORDS = (300, 520, 760)  # three shared prefixes
REQUESTS = 32
IN_FLIGHT = 8
MAX_TOKENS = 8


def workload() -> list[tuple[str, int]]:
    """(prompt, prompt tokens incl. BOS): shared prefixes, suffixes of varied length, never a block multiple."""
    rng = random.Random(18)
    prefixes = [random_prompt(n, rng) for n in PREFIX_WORDS]
    prompts = []
    for i in range(REQUESTS):
        prefix_words = PREFIX_WORDS[i % len(PREFIX_WORDS)]
        suffix_words = rng.randrange(20, 420)
        if (prefix_words + suffix_words + 1) % BLOCK == 0:
            suffix_words += 1
        prompts.append((prefixes[i % len(PREFIX_WORDS)] + " " + random_prompt(suffix_words, rng),
                        prefix_words + suffix_words + 1))
    return prompts


def handed_off(tokens: int) -> int:
    """Every whole chunk and the tail's whole blocks (vllm_kvplugin.lmcache.block_tail)."""
    return warm_hit(tokens)


def chunk_files(directory: Path) -> set[Path]:
    return set(directory.rglob("*.kvchunk"))


def slow_producer_config(workdir: Path, shared: Path) -> Path:
    """LMCache YAML for the producer: the slowed direct-I/O tier on ``shared`` is its only tier."""
    config = workdir / "producer-lmcache.yaml"
    config.write_text(
        f"chunk_size: {CHUNK}\nlocal_cpu: false\nmax_local_cpu_size: 0.2\nstorage_plugins: [kvplugin_slow]\n"
        "extra_config:\n"
        "  storage_plugin.kvplugin_slow.module_path: tests.e2e.slow_tier\n"
        "  storage_plugin.kvplugin_slow.class_name: SlowStoresTier\n"
        f"  kvplugin.directio.path: {shared}\n  kvplugin.directio.max_size_gb: 0.5\n"
        "  kvplugin.directio.io_threads: 4\n"
    )
    return config


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("pd-shared-kv")


@pytest.fixture(scope="module")
def servers(shared, tmp_path_factory, tiny_model):
    """(producer, consumer, colocated server without a connector), started side by side."""
    logs = tmp_path_factory.mktemp("pd-router")
    producer_kv = {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_producer",
                   "kv_connector_extra_config": {"kvplugin.save_mode": "async"}}
    producer_env = engine_env(LMCACHE_CONFIG_FILE=str(slow_producer_config(logs, shared)), PYTHONPATH=str(REPO))
    started = [
        VllmServer(tiny_model, producer_kv, logs / "producer.log", env=producer_env),
        VllmServer(tiny_model, scaled_example("consumer.json", {PLACEHOLDER_SHARED: str(shared)}),
                   logs / "consumer.log", env=engine_env()),
        VllmServer(tiny_model, None, logs / "colocated.log", env=engine_env()),
    ]
    with all_ready(started):
        yield started


@pytest.fixture(scope="module")
def runs(servers, tmp_path_factory, tiny_model):
    """The workload through the router (8 in flight) and on the colocated server: (prompts, PD replies, colocated)."""
    producer, consumer, colocated = servers
    prompts = workload()
    log = tmp_path_factory.mktemp("router") / "router.log"
    with PDRouter(producer.base_url, consumer.base_url, tiny_model, log) as router, \
            ThreadPoolExecutor(IN_FLIGHT) as pool:
        start = time.monotonic()
        pd = list(pool.map(lambda p: router.reply(p[0], MAX_TOKENS), prompts))
        pd_seconds = time.monotonic() - start
        alone = list(pool.map(lambda p: colocated.reply(p[0], MAX_TOKENS), prompts))
    return prompts, pd, alone, pd_seconds


def counter_reaches(server, name: str, expected: float, timeout: float = 20.0) -> bool:
    """Whether ``vllm:kvplugin_<name>`` reads ``expected`` (stats travel with engine steps: they may trail)."""
    deadline = time.monotonic() + timeout
    while (value := scrape(server).get("vllm:kvplugin_" + name, ("", 0.0))[1]) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"vllm:kvplugin_{name} reads {value}, expected {expected}")
        time.sleep(0.5)
    return True


def handoff_report(reply: dict) -> dict:
    return (reply.get("kv_transfer_params") or {}).get("kvplugin") or {}


def test_every_reply_through_the_router_equals_the_colocated_server(runs):
    prompts, pd, alone, _ = runs
    assert len(pd) == len(alone) == REQUESTS
    for (prompt, tokens), through_router, colocated in zip(prompts, pd, alone):
        assert through_router["usage"]["prompt_tokens"] == colocated["usage"]["prompt_tokens"] == tokens
        assert through_router["choices"][0]["text"] == colocated["choices"][0]["text"]
        assert through_router["usage"]["completion_tokens"] == MAX_TOKENS


def test_the_decode_server_loads_every_whole_block_the_slowed_prefill_server_handed_off(runs, servers):
    """Each store was slowed past the prefill, yet every decode lookup found every whole block it stored."""
    prompts, pd, _, pd_seconds = runs
    for (_, tokens), reply in zip(prompts, pd):
        assert handoff_report(reply) == {"handed_off_tokens": handed_off(tokens),
                                         "loaded_tokens": handed_off(tokens)}
    assert pd_seconds > STORE_DELAY_S  # the slowed writes were on the requests' path
    _, consumer, _ = servers
    assert counter_reaches(consumer, "hit_tokens", sum(handed_off(tokens) for _, tokens in prompts))


def test_the_router_reports_the_prefill_servers_cached_tokens(runs):
    """What users see through vllm-router 0.1.17 (README): usage carries the producer's figure, 0."""
    _, pd, _, _ = runs
    assert all(r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for r in pd)
    assert all(handoff_report(r)["loaded_tokens"] > 0 for r in pd)


def test_the_producer_never_loads(runs, servers):
    producer, _, _ = servers
    prompts, _, _, _ = runs
    again = [producer.reply(prompt, 2) for prompt, _ in prompts[:2]]  # asked directly: stored, yet recomputed
    assert all(r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for r in again)
    assert all(handoff_report(r)["handed_off_tokens"] > 0 and "loaded_tokens" not in handoff_report(r)
               for r in again)
    samples = scrape(producer)
    assert samples["vllm:kvplugin_lookups"][1] >= REQUESTS
    assert samples.get("vllm:kvplugin_hit_tokens", ("", 0.0))[1] == 0


def test_the_consumer_never_stores(runs, servers, shared):
    _, consumer, _ = servers
    before = chunk_files(shared)
    prompt = random_prompt(500, random.Random(19))
    first, again = consumer.reply(prompt), consumer.reply(prompt)
    time.sleep(1.0)
    assert chunk_files(shared) == before
    assert handoff_report(first)["loaded_tokens"] == handoff_report(again)["loaded_tokens"] == 0
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert scrape(consumer).get("vllm:kvplugin_stored_bytes", ("", 0.0))[1] == 0
