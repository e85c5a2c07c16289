# SPDX-License-Identifier: Apache-2.0
"""Create our connector through vLLM's own factory, for both roles, in a fresh process.

Run as ``python factory_probe.py MODEL_DIR WORKDIR``; prints one JSON line. A
separate process because LMCache's ZMQ servers may abort the interpreter while
they shut down (libzmq ``signaler.cpp`` assertion), which must not take pytest
with them; the probe exits with ``os._exit`` once its answer is printed.
"""

import json
import os
import sys

import torch


def main(model: str, workdir: str) -> dict:
    from vllm.config import set_current_vllm_config
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.parallel_state import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    vllm_config = EngineArgs(  # EngineArgs runs vLLM's load_general_plugins()
        model=model, dtype="float32", block_size=32, max_model_len=1024, enforce_eager=True,
        enable_prefix_caching=False,
        kv_transfer_config={
            "kv_connector": "LMCachePortableConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"lmcache.chunk_size": 64, "lmcache.max_local_cpu_size": 0.05},
        },
    ).create_engine_config()
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)])

    scheduler = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config)
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{workdir}/dist", backend="gloo"
        )
        ensure_model_parallel_initialized(1, 1)
        worker = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
    buf = torch.zeros(4 * 16 * 2 * 32 * 64, dtype=torch.float32)  # LBHNC, one shared buffer
    worker.register_kv_caches({name: buf.view(4, 16, 2, 32, 64)[i] for i, name in enumerate(layers)})
    engine = worker._adapter.lmcache_engine
    return {
        "scheduler": type(scheduler).__name__,
        "scheduler_role": scheduler.role.name,
        "worker": type(worker).__name__,
        "worker_role": worker.role.name,
        "mover": type(engine.gpu_connector).__name__,
        "fused": engine.gpu_connector.blocks.fused,
        "healthy": engine.is_healthy(),
        "model_name": engine.metadata.model_name,
    }


if __name__ == "__main__":
    try:
        result = main(sys.argv[1], sys.argv[2])
    except (RuntimeError, ValueError) as e:  # a refusal to start is an answer too
        result = {"error": str(e)}
    print(json.dumps(result), flush=True)
    os._exit(0)
