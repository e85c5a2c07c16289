# SPDX-License-Identifier: Apache-2.0
"""Where a Redis password ends up in the worker's output, with the checksummed remote tier.

vLLM logs its whole engine config (``kv_transfer_config`` included) and LMCache
dumps its config ("Creating LMCacheEngine with config", ``extra_config``
included), so a password inside ``kvplugin.remote.url`` reaches the log
whatever the tier does; the tier takes it from ``KVPLUGIN_REMOTE_PASSWORD``
instead and then nothing prints it. Each engine runs in its own process, as a
vLLM worker would, against a real password-protected redis-server, and the
whole output is searched.
"""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from vllm_kvplugin.bench.redis_server import RedisServer

SECRET = "s3cret-" + uuid.uuid4().hex[:8]
ENGINE = r"""
import sys, time, torch
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from kv_helpers import paged_kv, slot_mapping
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector
from vllm_kvplugin.lmcache.settings import apply_extra_config

cfg = apply_extra_config(LMCacheEngineConfig.from_defaults(local_cpu=False, max_local_cpu_size=0.05),
                         {"lmcache.chunk_size": 32, "kvplugin.remote.url": sys.argv[1]}, 16)
md = LMCacheMetadata(model_name="m", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                     kv_dtype=torch.bfloat16, kv_shape=(2, 2, 32, 2, 32), role="worker", chunk_size=32)
engine = LMCacheEngineBuilder.get_or_create("creds", cfg, md, PortableGPUConnector(md, 16), lambda t, s: t,
                                            lambda o, s: o)
engine.post_init()
tokens = torch.arange(64)
engine.store(tokens, kvcaches=paged_kv(2, 16, 2, 16, 32, 1), slot_mapping=slot_mapping(list(range(4)), 64, 16))
deadline = time.monotonic() + 20
while engine.lookup(tokens) < 64 and time.monotonic() < deadline:
    time.sleep(0.1)
print("HITS", engine.lookup(tokens), flush=True)
import os; os._exit(0)  # LMCache's shutdown can abort an interpreter; the log is what matters here
"""


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis-auth"), password=SECRET) as server:
        yield server


def run_engine(url: str, env: dict) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "KVPLUGIN_"))}
    proc = subprocess.run([sys.executable, "-c", ENGINE, url], capture_output=True, text=True, timeout=120,
                          env={**clean, "LMCACHE_TRACK_USAGE": "false", **env}, cwd=Path(__file__).parent)
    return proc.stdout + proc.stderr


def test_password_from_the_environment_is_used_and_never_printed(redis):
    log = run_engine(f"redis://127.0.0.1:{redis.port}", {"KVPLUGIN_REMOTE_PASSWORD": SECRET})
    assert "HITS 64" in log  # authenticated: the server refuses clients without the password
    assert SECRET not in log


def test_a_password_in_the_url_works_and_the_tier_warns_where_it_leaks(redis):
    log = run_engine(redis.url, {})
    assert "HITS 64" in log
    assert "set KVPLUGIN_REMOTE_PASSWORD" in log
    assert not [line for line in log.splitlines() if SECRET in line and "kvplugin_remote: " in line]


def test_without_the_password_every_lookup_is_a_miss_not_an_error(redis):
    log = run_engine(f"redis://127.0.0.1:{redis.port}", {})
    assert "HITS 0" in log and "Traceback" not in log
