# SPDX-License-Identifier: Apache-2.0
"""The README's main job: a real ``vllm serve`` with LMCachePortableConnector, a long prompt, twice.

Runs in the user's shell process; the server runs as vLLM's own processes.

The server runs with vLLM's prefix cache off, so the second request can only
skip prefill if its KV comes back through our connector from LMCache.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from vllm_kvplugin.demo.model import ModelShape, generate_model, random_prompt
from vllm_kvplugin.demo.server import VllmServer

# Big enough that prefilling a few thousand tokens takes seconds on two cores.
DEMO_SHAPE = ModelShape(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=4096,
)
CONNECTOR = {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both"}


def engine_env() -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"),
        "LMCACHE_TRACK_USAGE": "false",
        "DO_NOT_TRACK": "1",
    }


def run(workdir: Path, prompt_tokens: int = 3000) -> int:
    """Run the demo; return a process exit code (non-zero if the KV was not reused correctly)."""
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[1/3] generating a random-weight Llama ({DEMO_SHAPE.num_hidden_layers} layers) in {workdir}/model")
    model = str(generate_model(workdir / "model", DEMO_SHAPE))
    prompt = random_prompt(prompt_tokens - 1, random.Random(0), DEMO_SHAPE)  # + BOS

    log = workdir / "vllm-serve.log"
    print(f"[2/3] starting vllm serve with LMCachePortableConnector (log: {log})")
    with VllmServer(model, CONNECTOR, log, env=engine_env()) as server:
        server.complete("w1 w2 w3", max_tokens=2)  # warm-up: first-request overheads
        print("[3/3] sending a long prompt twice")
        cold = server.complete(prompt)
        warm = server.complete(prompt)

    same = cold.text == warm.text
    rows = [
        ("prompt tokens", f"{cold.prompt_tokens}"),
        ("TTFT cold (prefill)", f"{cold.ttft_s * 1000:.0f} ms"),
        ("TTFT warm (KV from LMCache)", f"{warm.ttft_s * 1000:.0f} ms"),
        ("speed-up", f"{cold.ttft_s / warm.ttft_s:.1f}x"),
        ("tokens loaded from LMCache", f"{warm.cached_tokens}"),
        ("greedy output identical", "yes" if same else "NO"),
    ]
    print("\n| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    ok = same and warm.cached_tokens > 0 and cold.cached_tokens == 0
    if not ok:
        print(f"\nFAILED: the KV was not reused correctly; see {log}")
    return 0 if ok else 1
