# SPDX-License-Identifier: Apache-2.0
"""Our connector driven the way each model runner drives it (runner_harness.py), byte-checked.

vllm-gaudi's runner (pinned at 091bbadd) gates the forward context on
LMCache's metadata type and drops load errors; vLLM's own runner is called
through its real ``KVConnectorModelRunnerMixin``. In every case, after the
load of a repeated prompt, the blocks the scheduler counts as computed hold
exactly the bytes first computed for them, and no other block (vllm-gaudi's
pad block included) was written — with intact and with damaged chunk files.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmcache.v1.metadata import LMCacheMetadata

from tests.e2e.engines import warm_hit
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector

HARNESS = Path(__file__).with_name("runner_harness.py")


def replay(tiny_model, tmp_path, runner, block_size=32, chunk_size=64, lengths=(200, 333, 520), **spec) -> dict:
    rng = random.Random(sum(lengths) + block_size)
    spec = {
        "model": tiny_model, "workdir": str(tmp_path), "directory": str(tmp_path / "kv"), "runner": runner,
        "block_size": block_size, "chunk_size": chunk_size, "num_blocks": 4 * sum(-(-n // block_size) for n in lengths),
        "prompts": [[1] + [rng.randrange(3, 1000) for _ in range(n - 1)] for n in lengths], **spec,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = subprocess.run([sys.executable, str(HARNESS), str(tmp_path / "spec.json")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["log"] = out.stderr
    result["lengths"] = lengths
    return result


def assert_every_load_exact(passes) -> None:
    """Each step: every scheduled request's counted blocks exact, nothing else written."""
    for p in passes:
        for step in p["steps"]:
            assert step["only_loaded_blocks_written"], step
            assert all(ok for key, ok in step.items() if key.startswith(("cold-", "warm-"))), step


@pytest.mark.parametrize("gate", [True, False], ids=["gaudi-forward-context", "no-attn-metadata"])
def test_gaudi_runner_loads_exact_bytes_into_exactly_the_counted_blocks(tiny_model, tmp_path, gate):
    """``gate=False`` hands ``start_load_kv`` a context without attention metadata on every step (what
    vllm-gaudi does for any metadata not LMCache's type): LMCache alone would skip every load."""
    result = replay(tiny_model, tmp_path, "gaudi", gate=gate)
    assert_every_load_exact([result["first"], result["second"]])
    steps = result["second"]["steps"]
    assert all(s["metadata_is_lmcache_type"] and s["metadata_requests"] > 0 for s in steps)
    cached = list(result["second"]["cached"].values())
    assert cached == [warm_hit(n) for n in result["lengths"]]  # block 32
    assert all(c >= 64 for c in cached)


def test_gaudi_runner_with_damaged_chunks_never_counts_a_block_it_cannot_fill(tiny_model, tmp_path):
    """Load errors are dropped by this runner: a bad chunk must be a miss before the scheduler counts it."""
    intact = replay(tiny_model, tmp_path / "intact", "gaudi", block_size=128, chunk_size=256,
                    lengths=(700, 1333, 2050), dtype="bfloat16")
    result = replay(tiny_model, tmp_path / "damaged", "gaudi", block_size=128, chunk_size=256,
                    lengths=(700, 1333, 2050), dtype="bfloat16", damage=True)
    assert_every_load_exact([result["first"], result["second"]])
    assert result["damaged"] > 0 and result["log"].count("discarding a bad chunk file") > 0
    damaged, clean = result["second"]["cached"], intact["second"]["cached"]
    assert sum(damaged.values()) < sum(clean.values())
    assert all(c % 128 == 0 for c in damaged.values())  # whole blocks: the chunks before a bad one


def test_vllm_runner_mixin_loads_exact_bytes(tiny_model, tmp_path):
    result = replay(tiny_model, tmp_path, "vllm", block_size=64, chunk_size=128, lengths=(300, 640, 1000),
                    connector="LMCachePortableConnector")
    assert_every_load_exact([result["first"], result["second"]])
    assert list(result["second"]["cached"].values()) == [warm_hit(n, 64) for n in result["lengths"]]


# -- vllm-gaudi's KV tensors handed to the mover directly ----------------------

def gaudi_metadata(kv_size: int, heads: int, head: int, use_mla: bool = False) -> LMCacheMetadata:
    return LMCacheMetadata(
        model_name="gaudi-shapes", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.bfloat16, kv_shape=(2, kv_size, 128, heads, head), use_mla=use_mla, role="worker",
        chunk_size=128,
    )


def test_fp8_scale_layout_with_only_k_registered_is_refused_with_the_reason():
    """Dynamic FP8 KV scales make vllm-gaudi register K alone (``len != 2``): no V to restore."""
    k_only = [torch.zeros(9 * 16, 2, 64, dtype=torch.bfloat16).view(-1, 16, 2, 64)[:8] for _ in range(2)]
    mover = PortableGPUConnector(gaudi_metadata(2, 2, 64), block_size=16)
    with pytest.raises(ValueError, match="VLLM_DYNAMIC_KV_QUANT"):
        mover.register(k_only)


def test_gaudi_mla_layer_tensor_is_accepted():
    mla = [torch.zeros(9 * 16, 576, dtype=torch.bfloat16).view(-1, 16, 576)[:8] for _ in range(2)]
    blocks = PortableGPUConnector(gaudi_metadata(1, 1, 576, use_mla=True), block_size=16).register(mla)
    assert blocks.num_blocks == 8
