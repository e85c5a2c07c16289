# SPDX-License-Identifier: Apache-2.0
"""The checksummed remote tier inside real LMCacheEngines, on a real redis-server and a real S3 server.

Every test runs against both stores (Redis; SeaweedFS's S3 gateway). Values
are damaged the way a shared store can damage them (a flipped byte, a
truncated value, another key's value under this key): each is a miss and is
deleted, never bytes. The server killed, hung and restarted costs misses and
skipped stores only, each call bounded by the tier's timeout; a password or
secret key is never logged. A prefill hand-off waits for slow writes to the
store, and the decode side then finds every chunk.
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

from tests.storage.damaged_chunks import VALUE_DAMAGES, damaged_value
from vllm_kvplugin.bench.redis_server import RedisServer
from vllm_kvplugin.bench.s3_server import SeaweedS3
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector
from vllm_kvplugin.lmcache.handoff import wait_for_tier_writes
from vllm_kvplugin.lmcache.remote_tier import PLUGIN_NAME, plugin_config
from vllm_kvplugin.storage.redis_store import KEY_PREFIX
from vllm_kvplugin.storage.s3_store import DEFAULT_PREFIX

SECRET = "pw-" + uuid.uuid4().hex[:8]


class RedisValues:
    """The test's view of a Redis holding chunk values."""

    def __init__(self, server: RedisServer):
        self.server, self.secret, self.logged_url = server, SECRET, "redis://***@127.0.0.1"
        self.extra = {"kvplugin.remote.url": server.url}
        self._client = redis_py.Redis.from_url(server.url)

    def key(self, name: str) -> str:
        return KEY_PREFIX + name

    def keys(self) -> list[str]:
        return sorted(k.decode() for k in self._client.keys(KEY_PREFIX + "*"))

    def get(self, key: str) -> bytes:
        return self._client.get(key)

    def set(self, key: str, value: bytes) -> None:
        self._client.set(key, value)

    def exists(self, key: str) -> bool:
        return bool(self._client.exists(key))

    def clear(self) -> None:
        self._client.flushall()


class S3Values:
    """The test's view of a bucket holding chunk objects."""

    def __init__(self, server: SeaweedS3):
        self.server, self.secret, self.logged_url = server, server.secret_key, f"s3://{server.bucket}/"
        self.extra = {"kvplugin.remote.url": server.url, "kvplugin.remote.endpoint_url": server.endpoint_url}
        self._client, self._bucket = server.client(), server.bucket

    def key(self, name: str) -> str:
        return f"{DEFAULT_PREFIX}/{name}"

    def keys(self) -> list[str]:
        listing = self._client.list_objects_v2(Bucket=self._bucket, Prefix=DEFAULT_PREFIX + "/")
        return sorted(o["Key"] for o in listing.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self._client.get_object(Bucket=self._bucket, Key=key)["Body"].read()

    def set(self, key: str, value: bytes) -> None:
        self._client.put_object(Bucket=self._bucket, Key=key, Body=value)

    def exists(self, key: str) -> bool:
        return key in self.keys()

    def clear(self) -> None:
        for key in self.keys():
            self._client.delete_object(Bucket=self._bucket, Key=key)


@pytest.fixture(params=["redis", "s3"])
def store(request, tmp_path, monkeypatch):
    """A running store, empty, with the tier's credentials in this process's environment."""
    if request.param == "redis":
        with RedisServer(tmp_path, password=SECRET) as server:
            yield RedisValues(server)
        return
    server = request.getfixturevalue("s3_server")
    if not server.ping():
        server.start()
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    values = S3Values(server)
    values.clear()
    yield values
    server.thaw()
    if not server.ping():
        server.start()


@pytest.fixture
def remote_engines():
    made = []

    def make(extra, timeout_s=0.5):
        cfg = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=0.05)
        tier = plugin_config({**extra, "kvplugin.remote.timeout_s": timeout_s})
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


def store_kv(engine, seed):
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


def test_two_engines_share_chunks_bit_exact(store, remote_engines):
    first, second = remote_engines(store.extra), remote_engines(store.extra)
    src = store_kv(first, seed=1)
    assert len(store.keys()) == 3
    hits, dst = load(second)
    assert hits == 96
    assert_loaded(src, dst)


@pytest.mark.parametrize("damage", VALUE_DAMAGES)
def test_a_damaged_value_is_a_miss_and_is_deleted(store, remote_engines, damage):
    engine = remote_engines(store.extra)
    src = store_kv(engine, seed=2)
    in_order = [store.key(key.to_string()) for _, _, key in engine.token_database.process_tokens(TOKENS)]
    victim = in_order[1]
    store.set(victim, damaged_value(store.get(victim), damage, store.get(in_order[2])))
    hits, dst = load(engine)
    assert hits == 32  # the first chunk only
    assert_loaded(src, dst, blocks=2)
    assert not store.exists(victim)


def test_what_a_lookup_promised_loads_even_if_the_values_vanish(store, remote_engines):
    engine = remote_engines(store.extra)
    src = store_kv(engine, seed=3)
    assert engine.lookup(TOKENS, lookup_id="req", pin=True) == 96
    store.clear()
    dst = kv()
    assert int(engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=slots(DST_TABLE, 100), req_id="req").sum()) == 96
    assert_loaded(src, dst)
    engine.lookup_unpin("req")
    assert len(tier(engine)._held) == 0


def test_server_down_hung_and_back_costs_misses_only(store, remote_engines):
    engine = remote_engines(store.extra, timeout_s=0.5)
    store_kv(engine, seed=4)
    server = store.server
    server.kill()
    began = time.monotonic()
    assert load(engine)[0] == 0
    engine.store(TOKENS + 1000, kvcaches=kv(seed=5), slot_mapping=slots(SRC_TABLE, 100))  # skipped, no raise
    assert time.monotonic() - began < 5
    server.start()
    time.sleep(2.5)  # the tier's quiet period after a failure
    src = store_kv(engine, seed=6)
    assert load(engine)[0] == 96
    server.freeze()
    try:
        began = time.monotonic()
        assert load(engine)[0] == 0  # the chunks are there, but the server does not answer
        assert time.monotonic() - began < 3
    finally:
        server.thaw()
    time.sleep(2.5)
    hits, dst = load(engine)
    assert hits == 96
    assert_loaded(src, dst)


def test_a_prefill_hand_off_waits_for_slow_writes_and_the_decode_side_finds_every_chunk(
        store, remote_engines, monkeypatch):
    """What a kv_producer's step does before its reply (lmcache/handoff.py), on Redis and S3."""
    prefill, decode = remote_engines(store.extra, timeout_s=5.0), remote_engines(store.extra)
    put = type(tier(prefill).store).put

    def slow_put(self, *args, **kwargs):
        time.sleep(0.4)
        return put(self, *args, **kwargs)

    monkeypatch.setattr(type(tier(prefill).store), "put", slow_put)
    src = kv(seed=9)
    prefill.store(TOKENS, kvcaches=src, slot_mapping=slots(SRC_TABLE, 100))
    assert len(store.keys()) < 3  # LMCache returned with the writes still in flight
    assert not wait_for_tier_writes([tier(prefill)], 0.1, {"r"})  # bounded: too slow is answered anyway
    assert wait_for_tier_writes([tier(prefill)], 10.0, {"r"})
    assert len(store.keys()) == 3
    hits, dst = load(decode)
    assert hits == 96
    assert_loaded(src, dst)


def test_no_secret_is_ever_logged(store, remote_engines):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logs = [logging.getLogger(n) for n in ("vllm_kvplugin.lmcache.remote_tier", "vllm_kvplugin.lmcache.chunk_tier",
                                           "lmcache", "botocore", "boto3")]
    for log in logs:
        log.addHandler(handler)
    try:
        engine = remote_engines(store.extra)
        store_kv(engine, seed=7)
        store.server.kill()
        engine.store(TOKENS + 7, kvcaches=kv(seed=8), slot_mapping=slots(SRC_TABLE, 100))
        time.sleep(1)
    finally:
        for log in logs:
            log.removeHandler(handler)
    text = "\n".join(r.getMessage() for r in records)
    assert store.logged_url in text
    assert store.secret not in text
