# SPDX-License-Identifier: Apache-2.0
"""The README's main job: a real ``vllm serve`` with LMCachePortableConnector, a long prompt, twice.

Runs in the user's shell process; the server runs as vLLM's own processes.

The server runs with vLLM's prefix cache off, so the second request can only
skip prefill if its KV comes back through our connector from LMCache; then the
server is restarted and the prompt sent once more, to show the direct-I/O
tier's files warming a fresh engine.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from vllm_kvplugin.demo.model import ModelShape, generate_model, random_prompt
from vllm_kvplugin.demo.server import VllmServer

# Big enough that prefilling a few thousand tokens takes seconds on two cores.
DEMO_SHAPE = ModelShape(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=4096,
)


def connector(kv_dir: Path) -> dict:
    """LMCache's CPU tier (default) plus this plugin's direct-I/O tier in ``kv_dir``."""
    return {
        "kv_connector": "LMCachePortableConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"kvplugin.directio.path": str(kv_dir), "kvplugin.directio.max_size_gb": 2},
    }


def engine_env() -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"),
        "LMCACHE_TRACK_USAGE": "false",
        "DO_NOT_TRACK": "1",
    }


def print_table(rows: list[tuple[str, str]]) -> None:
    print("\n| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def prepare(workdir: Path, prompt_tokens: int, steps: int, kv_dir: Path) -> tuple[str, str]:
    """Step 1 of a demo: the model and the prompt; ``kv_dir`` emptied so that "cold" really is cold."""
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[1/{steps}] generating a random-weight Llama ({DEMO_SHAPE.num_hidden_layers} layers) in {workdir}/model")
    model = str(generate_model(workdir / "model", DEMO_SHAPE))
    shutil.rmtree(kv_dir, ignore_errors=True)
    return model, random_prompt(prompt_tokens - 1, random.Random(0), DEMO_SHAPE)  # + BOS


def run(workdir: Path, prompt_tokens: int = 3000) -> int:
    """Run the demo; return a process exit code (non-zero if the KV was not reused correctly)."""
    kv_dir = workdir / "kvcache"
    model, prompt = prepare(workdir, prompt_tokens, 4, kv_dir)
    log = workdir / "vllm-serve.log"
    print(f"[2/4] starting vllm serve with LMCachePortableConnector (log: {log})")
    with VllmServer(model, connector(kv_dir), log, env=engine_env()) as server:
        server.complete("w1 w2 w3", max_tokens=2)  # warm-up: first-request overheads
        print("[3/4] sending a long prompt twice")
        cold = server.complete(prompt)
        warm = server.complete(prompt)
    print("[4/4] restarting the server; the same prompt again (LMCache's CPU tier is gone, the files remain)")
    with VllmServer(model, connector(kv_dir), workdir / "vllm-serve-restarted.log", env=engine_env()) as server:
        server.complete("w1 w2 w3", max_tokens=2)
        restarted = server.complete(prompt)

    same = cold.text == warm.text == restarted.text
    rows = [
        ("prompt tokens", f"{cold.prompt_tokens}"),
        ("TTFT cold (prefill)", f"{cold.ttft_s * 1000:.0f} ms"),
        ("TTFT warm (KV from LMCache)", f"{warm.ttft_s * 1000:.0f} ms"),
        ("speed-up", f"{cold.ttft_s / warm.ttft_s:.1f}x"),
        ("tokens loaded from LMCache", f"{warm.cached_tokens}"),
        ("TTFT after a restart (KV from the direct-I/O tier)", f"{restarted.ttft_s * 1000:.0f} ms"),
        ("tokens loaded after the restart", f"{restarted.cached_tokens}"),
        ("greedy output identical (all three)", "yes" if same else "NO"),
    ]
    print_table(rows)
    ok = same and warm.cached_tokens > 0 and restarted.cached_tokens > 0 and cold.cached_tokens == 0
    if not ok:
        print(f"\nFAILED: the KV was not reused correctly; see {log}")
    return 0 if ok else 1
