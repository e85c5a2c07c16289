# SPDX-License-Identifier: Apache-2.0
"""Where a Redis password ends up in LMCache 0.5.6's logs, and the setting that keeps it out.

LMCache logs ``remote_url`` verbatim: in the config dump ("Creating LMCacheEngine
with config"), "Creating connector for URL", "Creating Redis connector for URL",
"Connection initialized/re-established at" and "Connected to remote storage at".
A ``redis://user:password@host:port`` URL therefore puts the password in the
worker's log five times. LMCache's RESP connector (``resp://host:port``, the
native ``lmcache_redis`` client) takes the credentials from the environment
(``LMCACHE_RESP_USERNAME``/``LMCACHE_RESP_PASSWORD``) instead, and logs only
host and port. Each engine runs in its own process, as a vLLM worker would,
against a real password-protected redis-server.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_kvplugin.demo.server import free_port

SECRET = "s3cret-pw-9f2"
ENGINE = r"""
import sys, time, torch
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from kv_helpers import paged_kv, slot_mapping
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector

cfg = LMCacheEngineConfig.from_defaults(chunk_size=32, local_cpu=False, max_local_cpu_size=0.05,
                                        remote_url=sys.argv[1], remote_serde="naive")
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
def redis_port():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--requirepass", SECRET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def run_engine(url: str, env: dict, attempts: int = 3) -> str:
    """The engine's output. LMCache 0.5.6's native RESP client sometimes never completes its first
    ``batch_exists_sync`` future (seen here about 1 run in 10, its own threads idle, no timeout of its
    own), so a run that hangs is killed and tried again; the log checked is a completed run's."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    for attempt in range(attempts):
        try:
            proc = subprocess.run([sys.executable, "-c", ENGINE, url], capture_output=True, text=True, timeout=60,
                                  env={**clean, "LMCACHE_TRACK_USAGE": "false", **env}, cwd=Path(__file__).parent)
        except subprocess.TimeoutExpired:
            if attempt == attempts - 1:
                raise
            continue
        return proc.stdout + proc.stderr


def test_a_password_in_remote_url_is_logged_by_lmcache(redis_port):
    log = run_engine(f"redis://default:{SECRET}@127.0.0.1:{redis_port}", {})
    assert "HITS 64" in log
    leaks = [line for line in log.splitlines() if SECRET in line]
    assert any("Creating LMCacheEngine with config" in line for line in leaks)
    assert any("Connected to remote storage at" in line for line in leaks)
    assert len(leaks) == 5


def test_resp_url_with_the_password_in_the_environment_logs_no_secret(redis_port):
    log = run_engine(f"resp://127.0.0.1:{redis_port}",
                     {"LMCACHE_RESP_USERNAME": "default", "LMCACHE_RESP_PASSWORD": SECRET})
    assert "HITS 64" in log  # authenticated: the server refuses clients without the password
    assert SECRET not in log
