# SPDX-License-Identifier: Apache-2.0
"""The checksummed remote tier inside real LMCacheEngines, on a real redis-server.

Values are damaged the way a shared store can damage them (a flipped byte, a
truncated value, another key's value under this key): each is a miss and is
deleted, never bytes. The server killed, hung and restarted costs misses and
skipped stores only, each call bounded by the tier's timeout; a password in
the URL is never logged.
"""

import logging
import time
import uuid

import pytest
import redis as redis_py
import torch
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from tier_helpers import BLOCK, CHUNK, DST_TABLE, HEAD, HEADS, LAYERS, SRC_TABLE, TOKENS, assert_loaded, kv, slots

from vllm_kvplugin.bench.redis_server import RedisServer
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector
from vllm_kvplugin.lmcache.remote_tier import PLUGIN_NAME, plugin_config
from vllm_kvplugin.storage.redis_store import KEY_PREFIX

SECRET = "pw-" + uuid.uuid4().hex[:8]


@pytest.fixture
def redis(tmp_path):
    with RedisServer(tmp_path, password=SECRET) as server:
        yield server


@pytest.fixture
def remote_engines():
    made = []

    def make(url, timeout_s=0.5):
        cfg = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=0.05)
        tier = plugin_config({"kvplugin.remote.url": url, "kvplugin.remote.timeout_s": timeout_s})
        cfg.storage_plugins, cfg.extra_config = tier["storage_plugins"], tier["extra_config"]
        md = LMCacheMetadata(
            model_name="m@kvplugin1/test", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
            kv_dtype=torch.bfloat16, kv_shape=(LAYERS, 2, CHUNK, HEADS, HEAD), role="worker", chunk_size=CHUNK,
        )
        engine_id = f"remote-{uuid.uuid4()}"
        made.append(engine_id)
        engine = LMCacheEngineBuilder.get_or_create(
            engine_id, cfg, md, PortableGPUConnector(md, BLOCK), lambda t, s: t, lambda o, s: o)
        engine.post_init()
        return engine

    yield make
    for engine_id in made:
        LMCacheEngineBuilder.destroy(engine_id)


def tier(engine):
    return engine.storage_manager.storage_backends[PLUGIN_NAME]


def store(engine, seed):
    src = kv(seed=seed)
    engine.store(TOKENS, kvcaches=src, slot_mapping=slots(SRC_TABLE, 100))
    deadline = time.monotonic() + 20
    while (tier(engine)._pending or engine.lookup(TOKENS) < 96) and time.monotonic() < deadline:
        time.sleep(0.05)
    return src


def load(engine, req="r"):
    dst = kv()
    hits = engine.lookup(TOKENS, lookup_id=req, pin=True)
    got = int(engine.retrieve(TOKENS[:hits], kvcaches=dst, slot_mapping=slots(DST_TABLE, hits), req_id=req).sum()) \
        if hits else 0
    engine.lookup_unpin(req)
    return got, dst


def values(redis):
    client = redis_py.Redis.from_url(redis.url)
    return client, sorted(client.keys(KEY_PREFIX + "*"))


def test_two_engines_share_chunks_bit_exact(redis, remote_engines):
    first, second = remote_engines(redis.url), remote_engines(redis.url)
    src = store(first, seed=1)
    assert len(values(redis)[1]) == 3
    hits, dst = load(second)
    assert hits == 96
    assert_loaded(src, dst)


@pytest.mark.parametrize("damage", ["flip-payload", "truncate", "flip-header", "another-key"])
def test_a_damaged_value_is_a_miss_and_is_deleted(redis, remote_engines, damage):
    engine = remote_engines(redis.url)
    src = store(engine, seed=2)
    client, keys = values(redis)
    in_order = [KEY_PREFIX.encode() + key.to_string().encode()
                for _, _, key in engine.token_database.process_tokens(TOKENS)]
    victim = in_order[1]
    value = bytearray(client.get(victim))
    if damage == "flip-payload":
        value[-3] ^= 0xFF
    elif damage == "flip-header":
        value[40] ^= 0xFF
    elif damage == "truncate":
        value = value[: len(value) // 2]
    else:
        value = bytearray(client.get(in_order[2]))
    client.set(victim, bytes(value))
    hits, dst = load(engine)
    assert hits == 32  # the first chunk only
    assert_loaded(src, dst, blocks=2)
    assert not client.exists(victim)


def test_what_a_lookup_promised_loads_even_if_the_values_vanish(redis, remote_engines):
    engine = remote_engines(redis.url)
    src = store(engine, seed=3)
    assert engine.lookup(TOKENS, lookup_id="req", pin=True) == 96
    values(redis)[0].flushall()
    dst = kv()
    assert int(engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=slots(DST_TABLE, 100), req_id="req").sum()) == 96
    assert_loaded(src, dst)
    engine.lookup_unpin("req")
    assert len(tier(engine)._held) == 0


def test_server_down_hung_and_back_costs_misses_only(redis, remote_engines):
    engine = remote_engines(redis.url, timeout_s=0.5)
    store(engine, seed=4)
    redis.kill()
    began = time.monotonic()
    assert load(engine)[0] == 0
    engine.store(TOKENS + 1000, kvcaches=kv(seed=5), slot_mapping=slots(SRC_TABLE, 100))  # skipped, no raise
    assert time.monotonic() - began < 5
    redis.start()
    time.sleep(2.5)  # the tier's quiet period after a failure
    src = store(engine, seed=6)
    assert load(engine)[0] == 96
    redis.freeze()
    try:
        began = time.monotonic()
        assert load(engine)[0] == 0  # the chunks are there, but the server does not answer
        assert time.monotonic() - began < 3
    finally:
        redis.thaw()
    time.sleep(2.5)
    hits, dst = load(engine)
    assert hits == 96
    assert_loaded(src, dst)


def test_the_password_is_never_logged(redis, remote_engines, caplog):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logs = [logging.getLogger(n) for n in ("vllm_kvplugin.lmcache.remote_tier", "vllm_kvplugin.lmcache.chunk_tier",
                                           "lmcache")]
    for log in logs:
        log.addHandler(handler)
    try:
        engine = remote_engines(redis.url)
        store(engine, seed=7)
        redis.kill()
        engine.store(TOKENS + 7, kvcaches=kv(seed=8), slot_mapping=slots(SRC_TABLE, 100))
        time.sleep(1)
    finally:
        for log in logs:
            log.removeHandler(handler)
    text = "\n".join(r.getMessage() for r in records)
    assert "redis://***@127.0.0.1" in text
    assert SECRET not in text
