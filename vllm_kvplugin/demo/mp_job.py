# SPDX-License-Identifier: Apache-2.0
"""``vllm-kvplugin demo --mp``: the README's main job in LMCache's multiprocess (MP) mode.

Runs in the user's shell process; ``lmcache server`` (as ``vllm-kvplugin
server`` starts it: host-memory L1 in shared memory, our direct-I/O L2 adapter)
and ``vllm serve`` run as their own processes.

The same connector name as the in-process demo, with LMCache's ``lmcache.mp.*``
keys: the worker moves KV with our device plugin (``engine_driven``), the
server keeps it. A long prompt is sent twice (vLLM's prefix cache off, so the
second can only skip prefill through the server); then vLLM is restarted (KV
from the server's memory), then the server too (KV from the L2 adapter's
files, checksummed, read into a fresh L1).
"""

from __future__ import annotations

from pathlib import Path

from vllm_kvplugin.demo.main_job import engine_env, prepare, print_table
from vllm_kvplugin.demo.server import VllmServer


def connector(server) -> dict:
    """LMCachePortableConnector in MP mode against ``server`` (LMCache's own keys)."""
    return {
        "kv_connector": "LMCachePortableConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": server.port},
    }


def run(workdir: Path, prompt_tokens: int = 3000) -> int:
    """Run the MP demo; return a process exit code (non-zero if the KV was not reused correctly)."""
    from vllm_kvplugin.mp.server import ServerProcess

    l2_dir = workdir / "kvcache-mp"
    model, prompt = prepare(workdir, prompt_tokens, 5, l2_dir)

    def served(server, log_name: str, times: int):
        """The prompt sent ``times`` to a fresh vllm serve against ``server``."""
        with VllmServer(model, connector(server), workdir / log_name, env=engine_env()) as vllm:
            vllm.complete("w1 w2 w3", max_tokens=2)  # warm-up: first-request overheads
            return [vllm.complete(prompt) for _ in range(times)]

    print(f"[2/5] starting vllm-kvplugin's lmcache server (L1 host memory + direct-I/O L2 in {l2_dir}) and "
          "vllm serve with LMCachePortableConnector in MP mode")
    with ServerProcess(workdir, l1_size_gb=1.0, directio_path=l2_dir) as server:
        print("[3/5] sending a long prompt twice")
        cold, warm = served(server, "vllm-serve-mp.log", 2)
        print("[4/5] restarting vllm serve; the same prompt again (KV from the server's memory)")
        (vllm_restarted,) = served(server, "vllm-serve-mp-restarted.log", 1)
        server_log = server.log_path
    print("[5/5] restarting the lmcache server too (its memory is gone, the L2 files remain)")
    with ServerProcess(workdir, l1_size_gb=1.0, directio_path=l2_dir) as server:
        (server_restarted,) = served(server, "vllm-serve-mp-server-restarted.log", 1)

    runs = (cold, warm, vllm_restarted, server_restarted)
    same = len({c.text for c in runs}) == 1
    print_table([
        ("prompt tokens", f"{cold.prompt_tokens}"),
        ("TTFT cold (prefill)", f"{cold.ttft_s * 1000:.0f} ms"),
        ("TTFT warm (KV from the lmcache server)", f"{warm.ttft_s * 1000:.0f} ms"),
        ("speed-up", f"{cold.ttft_s / warm.ttft_s:.1f}x"),
        ("tokens loaded", f"{warm.cached_tokens}"),
        ("TTFT after vllm serve restarted (server memory)", f"{vllm_restarted.ttft_s * 1000:.0f} ms, "
         f"{vllm_restarted.cached_tokens} tokens loaded"),
        ("TTFT after the server restarted too (L2 files)", f"{server_restarted.ttft_s * 1000:.0f} ms, "
         f"{server_restarted.cached_tokens} tokens loaded"),
        ("greedy output identical (all four)", "yes" if same else "NO"),
    ])
    ok = same and cold.cached_tokens == 0 and all(c.cached_tokens > 0 for c in runs[1:])
    if not ok:
        print(f"\nFAILED: the KV was not reused correctly; see the logs in {workdir} (server: {server_log})")
    return 0 if ok else 1
