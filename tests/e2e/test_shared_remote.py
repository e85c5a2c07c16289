# SPDX-License-Identifier: Apache-2.0
"""Two real ``vllm serve`` instances sharing one real store through the checksummed remote tier.

The module runs once per store: a Redis (comes back empty after a restart) and
an S3 bucket on SeaweedFS (keeps its objects). Both servers run with LMCache's
local CPU tier off, so every hit comes from the store. The tests run in file
order on one pair of servers and one store: the servers start while the store
is down, the store comes up, a prefix prefilled on instance A is warm on B, the
store hangs, and it is killed and restarted under a stream of requests to both
instances.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.e2e.engines import all_ready, engine_env, warm_hit
from vllm_kvplugin.bench.redis_server import RedisServer
from vllm_kvplugin.bench.s3_server import SeaweedS3
from vllm_kvplugin.demo.model import random_prompt
from vllm_kvplugin.demo.server import VllmServer

pytestmark = pytest.mark.e2e

CHUNK = 64
PROMPT_WORDS = 400  # 401 tokens with BOS: 6 whole chunks
EXPECTED_HIT = warm_hit(PROMPT_WORDS + 1)
RECONNECT_TIMEOUT_S = 90
OUTAGE_S = 10
HANG_S = 15  # far longer than the tier's call timeout (1 s) and LMCache's blocking_timeout_secs (10)


def remote_connector(tier: dict) -> dict:
    return {
        "kv_connector": "LMCachePortableConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "lmcache.chunk_size": CHUNK,
            "lmcache.local_cpu": False,  # hits can only come from the store
            "lmcache.max_local_cpu_size": 0.2,
            **tier,
        },
    }


@dataclass
class SharedStore:
    """A store server (start/kill/freeze/thaw/ping), the connector keys naming it, the servers' environment."""

    server: RedisServer | SeaweedS3
    tier: dict
    env: dict
    count: Callable[[], int]  # values or objects held


@pytest.fixture(scope="module", params=["redis", "s3"])
def store(request, tmp_path_factory):
    """The shared store, not started yet."""
    workdir = tmp_path_factory.mktemp(request.param)
    if request.param == "redis":
        redis = RedisServer(workdir)  # port chosen, not started yet
        shared = SharedStore(redis, {"kvplugin.remote.url": redis.url}, {}, redis.dbsize)
    else:
        s3 = SeaweedS3(workdir)
        shared = SharedStore(
            s3, {"kvplugin.remote.url": s3.url, "kvplugin.remote.endpoint_url": s3.endpoint_url}, s3.env,
            lambda: s3.client().list_objects_v2(Bucket=s3.bucket).get("KeyCount", 0))
    yield shared
    shared.server.thaw()
    shared.server.kill()


@pytest.fixture(scope="module")
def pair(store, tmp_path_factory, tiny_model):
    """Instances A and B, started while the store is down."""
    logs = tmp_path_factory.mktemp("remote-pair")
    servers = [
        VllmServer(tiny_model, remote_connector(store.tier), logs / f"{name}.log", env=engine_env(**store.env))
        for name in ("a", "b")
    ]
    with all_ready(servers):
        yield servers


def fresh_prompt(rng: random.Random) -> str:
    return random_prompt(PROMPT_WORDS, rng)


def wait_until_shared(a: VllmServer, b: VllmServer, rng: random.Random) -> float:
    """Seconds until a prompt prefilled on A is warm on B (the tier is back for both)."""
    start = time.monotonic()
    while time.monotonic() - start < RECONNECT_TIMEOUT_S:
        prompt = fresh_prompt(rng)
        a.complete(prompt)
        time.sleep(0.5)  # A's store is asynchronous
        if b.complete(prompt).cached_tokens == EXPECTED_HIT:
            return time.monotonic() - start
    pytest.fail(f"no shared hit within {RECONNECT_TIMEOUT_S}s after the store came up")


def test_servers_start_and_serve_while_the_store_is_down(pair, store):
    a, b = pair
    assert not store.server.ping()
    prompt = fresh_prompt(random.Random(1))
    cold_a, cold_b = a.complete(prompt), b.complete(prompt)
    assert cold_a.cached_tokens == cold_b.cached_tokens == 0
    assert cold_a.text == cold_b.text


def test_tier_connects_when_the_store_comes_up_without_restarting_vllm(pair, store):
    store.server.start()
    seconds = wait_until_shared(*pair, random.Random(2))
    print(f"shared hits {seconds:.1f}s after the store started")
    assert store.count() > 0


def test_prefix_prefilled_on_a_is_warm_on_b_with_equal_tokens(pair):
    a, b = pair
    prompt = fresh_prompt(random.Random(3))
    cold = a.complete(prompt, max_tokens=16)
    time.sleep(0.5)
    warm = b.complete(prompt, max_tokens=16)
    assert cold.cached_tokens == 0
    assert warm.cached_tokens == EXPECTED_HIT
    assert warm.text == cold.text


def test_the_store_hanging_longer_than_every_timeout_fails_no_request(pair, store):
    """A hung store (SIGSTOP for HANG_S): in-flight requests wait, then complete with unchanged tokens."""
    a, b = pair
    rng = random.Random(6)
    prompts = [fresh_prompt(rng) for _ in range(4)]
    reference = {p: a.complete(p).text for p in prompts}  # computed, and stored, while the store answers
    time.sleep(0.5)
    store.server.freeze()
    thaw = threading.Timer(HANG_S, store.server.thaw)
    thaw.start()
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            outs = list(pool.map(lambda i: (a, b)[i % 2].complete(prompts[i]), range(4)))
            stalled_s = time.monotonic() - start
    finally:
        thaw.join()
    print(f"hung store: 4 requests completed in {stalled_s:.1f}s, cached tokens {[o.cached_tokens for o in outs]}")
    assert [o.text for o in outs] == [reference[p] for p in prompts]
    wait_until_shared(a, b, random.Random(7))  # and the tier serves again


def test_the_store_killed_mid_stream_fails_no_request_and_hits_resume(pair, store):
    """A stream to both instances, 4 in flight: the store up, killed for OUTAGE_S, then back."""
    a, b = pair
    rng = random.Random(4)
    prompts = [fresh_prompt(rng) for _ in range(8)]
    reference = {p: a.complete(p).text for p in prompts}  # computed while the store is up
    phases = {"up": [], "down": [], "back": []}

    def send(i: int, phase: str):
        prompt = prompts[i % len(prompts)]
        try:
            out = (a, b)[i % 2].complete(prompt)
            phases[phase].append(out.text == reference[prompt] and out.completion_tokens == 8)
        except OSError as e:  # an HTTP error or a dropped connection: a failed request
            phases[phase].append(e)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(send, range(12), ["up"] * 12))
        store.server.kill()
        deadline, i = time.monotonic() + OUTAGE_S, 12
        while time.monotonic() < deadline:
            list(pool.map(send, range(i, i + 4), ["down"] * 4))
            i += 4
        store.server.start()
        list(pool.map(send, range(i, i + 12), ["back"] * 12))
    print({phase: len(r) for phase, r in phases.items()})
    for phase, results in phases.items():
        assert results and all(r is True for r in results), f"{phase}: {results}"
    seconds = wait_until_shared(a, b, random.Random(5))
    print(f"shared hits {seconds:.1f}s after the store restarted")
