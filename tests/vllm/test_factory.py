# SPDX-License-Identifier: Apache-2.0
"""vLLM's own KVConnectorFactory creates our connector for both roles, from a real VllmConfig."""

import pytest
import torch


@pytest.fixture(scope="module")
def vllm_config(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=tiny_model,
        dtype="float32",
        block_size=32,
        max_model_len=1024,
        enforce_eager=True,
        enable_prefix_caching=False,
        kv_transfer_config={
            "kv_connector": "LMCachePortableConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"lmcache.chunk_size": 64, "lmcache.max_local_cpu_size": 0.05},
        },
    )
    return args.create_engine_config()


def kv_cache_config(num_blocks=16):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32)
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)])


def test_factory_creates_the_portable_connector_for_the_scheduler(vllm_config):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from vllm_kvplugin.connector import LMCachePortableConnector

    connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config())
    try:
        assert isinstance(connector, LMCachePortableConnector)
        assert connector.role == KVConnectorRole.SCHEDULER
    finally:
        connector.shutdown()


def test_factory_creates_the_portable_connector_for_a_worker(vllm_config, tmp_path):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.parallel_state import ensure_model_parallel_initialized, init_distributed_environment

    from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector

    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{tmp_path}/dist", backend="gloo"
        )
        ensure_model_parallel_initialized(1, 1)
        connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER, kv_cache_config())
    try:
        buf = torch.zeros(4 * 16 * 2 * 32 * 64, dtype=torch.float32)
        views = {f"model.layers.{i}.self_attn.attn": buf.view(4, 16, 2, 32, 64)[i] for i in range(4)}
        connector.register_kv_caches(views)
        engine = connector._adapter.lmcache_engine
        assert isinstance(engine.gpu_connector, PortableGPUConnector)
        assert engine.gpu_connector.blocks.fused and engine.is_healthy()
        assert "@kvplugin1/cpu-" in engine.metadata.model_name  # layout fingerprint is in every key
    finally:
        connector.shutdown()
