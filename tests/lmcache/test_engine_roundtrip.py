# SPDX-License-Identifier: Apache-2.0
"""A real LMCacheEngine on CPU with the portable mover: store -> lookup -> retrieve, bit-exact."""


import pytest
import torch
from lmcache.v1.metadata import LMCacheMetadata
from kv_helpers import paged_kv, slot_mapping, wait_for_lookup

from vllm_kvplugin.devices import DeviceOps
from vllm_kvplugin.lmcache import gpu_connector
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector

LAYERS, BLOCKS, HEADS, BLOCK, HEAD = 3, 24, 2, 16, 32
CHUNK = 32


def kv_views(seed=None):
    return paged_kv(LAYERS, BLOCKS, HEADS, BLOCK, HEAD, seed)


def slots(block_table, num_tokens):
    return slot_mapping(block_table, num_tokens, BLOCK)


@pytest.fixture
def make_engine(mover_engines):
    def make(**config):
        md = LMCacheMetadata(
            model_name="kvplugin-test", world_size=1, local_world_size=1, worker_id=0,
            local_worker_id=0, kv_dtype=torch.bfloat16,
            kv_shape=(LAYERS, 2, CHUNK, HEADS, HEAD), role="worker", chunk_size=CHUNK,
        )
        return mover_engines(md, BLOCK, **config)

    return make


@pytest.mark.parametrize(
    "tier",
    [
        pytest.param({"local_cpu": True, "max_local_cpu_size": 0.05}, id="local-cpu"),
        pytest.param({"local_cpu": False, "max_local_cpu_size": 0.05, "max_local_disk_size": 0.1}, id="local-disk-only"),
    ],
)
def test_store_lookup_retrieve_is_bit_exact(make_engine, tmp_path, tier):
    if "max_local_disk_size" in tier:
        tier = {**tier, "local_disk": f"file://{tmp_path}/"}
    engine = make_engine(**tier)
    num_tokens = 100  # 3 whole chunks of 32 (96 tokens); the partial tail is not stored
    tokens = torch.randint(0, 1000, (num_tokens,), generator=torch.Generator().manual_seed(0))
    src = kv_views(seed=7)
    src_table = [5, 17, 2, 9, 11, 3, 20]  # non-contiguous, unordered physical blocks
    engine.store(tokens, kvcaches=src, slot_mapping=slots(src_table, num_tokens))

    assert wait_for_lookup(engine, tokens, 96) == 96
    if "local_disk" in tier:
        assert len(list(tmp_path.rglob("*"))) >= 3  # the chunks really went to files

    dst = kv_views()
    dst_table = [1, 4, 6, 8, 10, 12, 14]  # a different engine would place them elsewhere
    hit = engine.retrieve(tokens, kvcaches=dst, slot_mapping=slots(dst_table, num_tokens))
    assert int(hit.sum()) == 96
    for s, d in zip(src, dst):
        for sb, db in zip(src_table[:6], dst_table[:6]):
            assert torch.equal(d[db].view(torch.int8), s[sb].view(torch.int8))
        untouched = sorted(set(range(BLOCKS)) - set(dst_table[:6]))
        assert not d[untouched].any()


def test_a_load_fills_the_memory_the_kv_tensors_have_now(make_engine):
    """Regression: the mover recognised its registered KV by ``id()``. A freed list's ids come back for
    the next list of the same shape (seen in test_tier_failures, 1 run in 10): a load then filled the
    old tensors and left the new ones zero under a full hit. Here the same Python tensors are moved
    onto new memory (``set_``), which is that case made deterministic."""
    engine = make_engine(local_cpu=True, max_local_cpu_size=0.05)
    tokens, table = torch.arange(64), [0, 1, 2, 3]
    src = kv_views(seed=5)
    engine.store(tokens, kvcaches=src, slot_mapping=slots(table, 64))
    assert wait_for_lookup(engine, tokens, 64) == 64
    dst = kv_views()
    assert int(engine.retrieve(tokens, kvcaches=dst, slot_mapping=slots(table, 64)).sum()) == 64
    for tensor, fresh in zip(dst, kv_views()):  # same ids, new (zeroed) memory
        tensor.set_(fresh.untyped_storage(), fresh.storage_offset(), fresh.shape, fresh.stride())
    assert int(engine.retrieve(tokens, kvcaches=dst, slot_mapping=slots(table, 64)).sum()) == 64
    assert all(torch.equal(d[:4].view(torch.int8), s[:4].view(torch.int8)) for s, d in zip(src, dst))


def test_a_different_prefix_misses(make_engine):
    engine = make_engine(local_cpu=True, max_local_cpu_size=0.05)
    tokens = torch.arange(64)
    engine.store(tokens, kvcaches=kv_views(seed=1), slot_mapping=slots([0, 1, 2, 3], 64))
    assert wait_for_lookup(engine, tokens, 64) == 64
    other = tokens.clone()
    other[0] = 999  # changes the first chunk's hash and so every chunk after it
    assert engine.lookup(other) == 0


def test_chunk_not_on_block_boundary_is_refused():
    md = LMCacheMetadata(
        model_name="m", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.bfloat16, kv_shape=(LAYERS, 2, CHUNK, HEADS, HEAD), role="worker", chunk_size=CHUNK,
    )
    mover = PortableGPUConnector(md, BLOCK)
    with pytest.raises(ValueError, match="not whole blocks"):
        mover._block_ids(torch.arange(64), 8, 40)


def test_registering_kv_of_another_shape_is_refused():
    md = LMCacheMetadata(
        model_name="m", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.bfloat16, kv_shape=(LAYERS, 2, CHUNK, HEADS + 1, HEAD), role="worker", chunk_size=CHUNK,
    )
    with pytest.raises(ValueError, match="metadata implies"):
        PortableGPUConnector(md, BLOCK).register(kv_views())


class StagingOps(DeviceOps):
    """An accelerator's device module at the boundary: forces the staging path, counts syncs.

    CPU has no separate device memory, so this is how the HPU/CUDA path of the
    mover (device buffer, async copy, one synchronize per batch) runs here.
    """

    def __init__(self):
        super().__init__("cpu")
        self.flushes = self.syncs = 0

    def needs_staging(self, kv_device, host_device):
        return True

    def flush(self):
        self.flushes += 1

    def synchronize(self):
        self.syncs += 1


def test_accelerator_staging_path_is_bit_exact_and_syncs_once_per_batch(make_engine, monkeypatch):
    ops = StagingOps()
    monkeypatch.setattr(gpu_connector, "device_ops", lambda device_type: ops)
    engine = make_engine(local_cpu=True, max_local_cpu_size=0.05)
    tokens = torch.arange(96)
    src, src_table = kv_views(seed=3), [7, 0, 13, 21, 2, 9]
    engine.store(tokens, kvcaches=src, slot_mapping=slots(src_table, 96))
    assert (ops.flushes, ops.syncs) == (3, 1)  # 3 chunks, one batch
    assert wait_for_lookup(engine, tokens, 96) == 96
    dst, dst_table = kv_views(), [1, 2, 3, 4, 5, 6]
    engine.retrieve(tokens, kvcaches=dst, slot_mapping=slots(dst_table, 96))
    assert ops.syncs == 2
    for s, d in zip(src, dst):
        assert torch.equal(d[dst_table].view(torch.int8), s[src_table].view(torch.int8))


@pytest.mark.parametrize("huge_pages", [False, True])
def test_the_kv_memory_is_prepared_only_when_kvplugin_huge_pages_is_on(monkeypatch, huge_pages):
    """``kvplugin.huge_pages`` reaches the device module at registration, with every KV tensor; off by default."""
    asked = []

    class Recording(DeviceOps):
        def prepare_kv_memory(self, kv_tensors, log):
            asked.append(len(kv_tensors))

    monkeypatch.setattr(gpu_connector, "device_ops", lambda device_type: Recording(device_type))
    md = LMCacheMetadata(
        model_name="m", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.bfloat16, kv_shape=(LAYERS, 2, CHUNK, HEADS, HEAD), role="worker", chunk_size=CHUNK,
    )
    PortableGPUConnector(md, BLOCK, huge_pages).register(kv_views())
    assert asked == ([LAYERS] if huge_pages else [])
    PortableGPUConnector(md, BLOCK).register(kv_views())
    assert len(asked) == int(huge_pages)
