# SPDX-License-Identifier: Apache-2.0
"""The remote L2 adapter (checksummed chunks in a Redis or an S3 bucket) as an LMCache MP server drives it.

Real LMCache objects and event fds (:mod:`tests.mp.l2_helpers`), a real
redis-server and a real S3 server (SeaweedFS) on loopback. Two adapters on one
store stand for two servers sharing it. A damaged value is a miss and is
deleted (LMCache's own ``resp`` and ``s3`` adapters would load it); a store
that is down fails stores and misses, bounded, never raising into LMCache.
"""

import json
import time

import pytest
import redis as redis_py
import torch

from tests.mp.l2_helpers import keys, load, lookup, memory_obj, store
from tests.storage.damaged_chunks import VALUE_DAMAGES, damaged_value
from vllm_kvplugin.bench.redis_server import RedisServer
from vllm_kvplugin.mp.l2_adapter import RemoteL2Adapter, RemoteL2AdapterConfig, object_key_text
from vllm_kvplugin.mp.server import remote_l2_adapter_json
from vllm_kvplugin.storage.redis_store import KEY_PREFIX
from vllm_kvplugin.storage.s3_store import DEFAULT_PREFIX

SHAPE = (2, 2, 64, 128)  # (kv, layers, tokens, hidden): 64 KiB of bf16


class Values:
    """Raw access to what the adapter stored under a chunk name, to damage it."""

    def __init__(self, kind, server):
        self.kind, self.server = kind, server
        if kind == "redis":
            self._client = redis_py.Redis.from_url(server.url)
        else:
            self._client = server.client()

    def get(self, name):
        if self.kind == "redis":
            return self._client.get(KEY_PREFIX + name)
        return self._client.get_object(Bucket=self.server.bucket, Key=f"{DEFAULT_PREFIX}/{name}")["Body"].read()

    def set(self, name, value):
        if self.kind == "redis":
            self._client.set(KEY_PREFIX + name, value)
        else:
            self._client.put_object(Bucket=self.server.bucket, Key=f"{DEFAULT_PREFIX}/{name}", Body=value)


@pytest.fixture(params=["redis", "s3"])
def shared(request, tmp_path, monkeypatch):
    """(adapter factory, raw values, server) on a running store with a fresh key space."""
    made = []
    if request.param == "redis":
        server = RedisServer(tmp_path).start()
        params = {"url": server.url}
    else:
        server = request.getfixturevalue("s3_server")
        if not server.ping():
            server.start()
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        params = {"url": f"{server.url}/{tmp_path.name}", "endpoint_url": server.endpoint_url}

    def make(**extra):
        adapter = RemoteL2Adapter(RemoteL2AdapterConfig.from_dict({**params, "timeout_s": 1, **extra}))
        made.append(adapter)
        return adapter

    values = Values(request.param, server)
    if request.param == "s3":  # objects of this test under their own prefix
        values.get = lambda name, get=values._client.get_object: get(
            Bucket=server.bucket, Key=f"{tmp_path.name}/{name}")["Body"].read()
        values.set = lambda name, value, put=values._client.put_object: put(
            Bucket=server.bucket, Key=f"{tmp_path.name}/{name}", Body=value)
    yield make, values, server
    for adapter in made:
        adapter.close()
    if request.param == "redis":
        server.kill()
    elif not server.ping():
        server.start()


def chunks(n, seed):
    torch.manual_seed(seed)
    return [memory_obj(SHAPE, fill=torch.randn(SHAPE)) for _ in range(n)]


def test_a_second_server_loads_what_the_first_stored_byte_exact(shared):
    make, _, _ = shared
    first, second = make(), make()
    ks, src = keys(3), chunks(3, seed=1)
    assert store(first, ks, src).is_successful()
    assert lookup(second, ks) == [True] * 3
    dst = [memory_obj(SHAPE) for _ in ks]
    assert load(second, ks, dst) == [True] * 3
    assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(src, dst))


@pytest.mark.parametrize("damage", VALUE_DAMAGES)
def test_a_damaged_value_is_a_miss_and_is_deleted(shared, damage):
    make, values, _ = shared
    adapter = make()
    ks, src = keys(3), chunks(3, seed=2)
    assert store(adapter, ks, src).is_successful()
    names = [object_key_text(k) for k in ks]
    values.set(names[1], damaged_value(values.get(names[1]), damage, values.get(names[2])))
    dst = [memory_obj(SHAPE) for _ in ks]
    assert load(adapter, ks, dst) == [True, False, True]
    assert torch.equal(src[0].tensor, dst[0].tensor) and torch.equal(src[2].tensor, dst[2].tensor)
    assert adapter.rejected == 1
    assert lookup(adapter, ks) == [True, False, True]  # deleted


def test_a_store_that_is_down_fails_stores_and_misses_without_raising(shared):
    make, _, server = shared
    adapter = make()
    ks, src = keys(2), chunks(2, seed=3)
    assert store(adapter, ks, src).is_successful()
    server.kill()
    began = time.monotonic()
    assert lookup(adapter, ks) == [False, False]
    assert load(adapter, ks, [memory_obj(SHAPE) for _ in ks]) == [False, False]
    assert not store(adapter, keys(1, model="org/other"), chunks(1, seed=4)).is_successful()
    assert time.monotonic() - began < 10
    assert not adapter.report_status()["is_healthy"]


def test_lmcache_loads_it_as_a_plugin_adapter_from_the_server_flags():
    """The ``--l2-adapter`` JSON ``vllm-kvplugin server --remote-url`` writes, through LMCache's own loader."""
    from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry
    from lmcache.v1.distributed.l2_adapters.plugin_l2_adapter import PluginL2AdapterConfig

    config = json.loads(remote_l2_adapter_json("s3://bucket/team", "http://127.0.0.1:1"))  # nobody listens
    adapter = create_l2_adapter_from_registry(PluginL2AdapterConfig.from_dict(config))
    assert isinstance(adapter, RemoteL2Adapter)
    assert adapter.store.url == "s3://bucket/team at http://127.0.0.1:1"
    adapter.close()


def test_bad_adapter_params_name_the_key():
    with pytest.raises(ValueError, match=r"unknown adapter_params \['path'\]"):
        RemoteL2AdapterConfig.from_dict({"url": "redis://h:1", "path": "/x"})
    with pytest.raises(ValueError, match="kvplugin.remote.url must be"):
        RemoteL2AdapterConfig.from_dict({"url": "http://h:1"})
    with pytest.raises(ValueError, match="kvplugin.remote.timeout_s must be a positive number"):
        RemoteL2AdapterConfig.from_dict({"url": "redis://h:1", "timeout_s": 0})
