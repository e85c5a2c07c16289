# SPDX-License-Identifier: Apache-2.0
"""Lookups and loads of many chunks read several at once, and answer exactly as one-at-a-time reads would.

Real LMCacheEngine, real direct-I/O files, prompts of more chunks than the
tier's ``read_ahead``: the hit is the prefix before the first bad chunk
whatever was read beyond it, exactly that prefix stays held and pinned (reads
past it are released, their files kept), the bytes load exact, and no more
than ``read_ahead`` reads run at once.
"""

import os
import threading
import time

import pytest
import torch
from kv_helpers import paged_kv, slot_mapping
from tier_helpers import BLOCK, BLOCKS, CHUNK, HEAD, HEADS, LAYERS, backend, settle

CHUNKS = BLOCKS * BLOCK // CHUNK  # 8: every block of the KV filled
TOKENS = torch.arange(CHUNKS * CHUNK) + 3
TABLE = list(range(BLOCKS))[::-1]  # blocks in reverse order: slots are not the token order


def kv(seed=None):
    return paged_kv(LAYERS, BLOCKS, HEADS, BLOCK, HEAD, seed)


def stored(engines, tmp_path, read_ahead, seed):
    engine = engines(tmp_path, read_ahead=read_ahead)
    src = kv(seed)
    engine.store(TOKENS, kvcaches=src, slot_mapping=slot_mapping(TABLE, len(TOKENS), BLOCK))
    assert settle(engine, TOKENS, len(TOKENS)) == len(TOKENS)
    return engine, src


def files_in_order(engine):
    names = [key.to_string() for _, _, key in engine.token_database.process_tokens(TOKENS)]
    return [backend(engine).directory.lookup(name) for name in names]


def allocated(engine) -> int:
    """Bytes of LMCache host memory in use (what held or leaked chunks occupy)."""
    return engine.storage_manager.local_cpu_backend.memory_allocator.pin_allocator.total_allocated_size


class ReadsInFlight:
    """Wraps a tier's ``_read``: each read takes ``delay_s`` longer, the most running at once and every
    host object a read returned are kept."""

    def __init__(self, tier, delay_s=0.05):
        self.read, self.delay_s = tier._read, delay_s
        self.now = self.most = 0
        self.objs = []
        self.lock = threading.Lock()
        tier._read = self

    def __call__(self, name):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(self.delay_s)
            obj = self.read(name)
            self.objs.append(obj)
            return obj
        finally:
            with self.lock:
                self.now -= 1

    def all_released(self) -> bool:
        """Every object read has no reference left (LMCache frees unreferenced ones when collected,
        so a leak shows in the count, not in the allocator)."""
        return all(obj.get_ref_count() == 0 for obj in self.objs if obj is not None)


@pytest.mark.parametrize("read_ahead, bad", [(1, 5), (3, 2), (4, 6), (16, 0)])
def test_the_hit_is_the_prefix_before_the_first_bad_chunk_and_only_it_stays_held(engines, tmp_path, read_ahead, bad):
    engine, src = stored(engines, tmp_path, read_ahead, seed=read_ahead + bad)
    files = files_in_order(engine)
    raw = bytearray(open(files[bad], "rb").read())
    raw[-3] ^= 0x40
    open(files[bad], "wb").write(raw)
    reads = ReadsInFlight(backend(engine))

    assert engine.lookup(TOKENS, lookup_id="req", pin=True) == bad * CHUNK
    assert reads.most <= read_ahead
    tier = backend(engine)
    assert len(tier._held) == bad and sum(tier.directory._pinned.values()) == bad
    held_names = {name for name in tier._held._holds}
    assert held_names == {key.to_string() for _, _, key in engine.token_database.process_tokens(TOKENS[: bad * CHUNK])}
    assert not os.path.exists(files[bad])  # the bad file is discarded, those read past it are kept
    assert all(os.path.exists(f) for f in files[bad + 1:])
    if bad:
        dst = kv()
        hit = engine.retrieve(TOKENS[: bad * CHUNK], kvcaches=dst,
                              slot_mapping=slot_mapping(TABLE, bad * CHUNK, BLOCK), req_id="req")
        assert int(hit.sum()) == bad * CHUNK
        for block in TABLE[: bad * CHUNK // BLOCK]:
            for s, d in zip(src, dst):
                assert torch.equal(d[block].view(torch.int8), s[block].view(torch.int8))
    engine.lookup_unpin("req")
    assert len(tier._held) == 0 and tier.directory._pinned == {}
    assert reads.all_released()  # every chunk read past the miss was given back
    assert allocated(engine) == 0


def test_a_load_reads_several_chunks_at_once_and_loads_them_exact(engines, tmp_path):
    engine, src = stored(engines, tmp_path, read_ahead=4, seed=5)
    reads = ReadsInFlight(backend(engine))
    dst = kv()
    start = time.monotonic()
    hit = engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=slot_mapping(TABLE, len(TOKENS), BLOCK))
    assert int(hit.sum()) == len(TOKENS)
    assert 2 <= reads.most <= 4  # 8 reads of 50 ms each, 4 at a time
    assert time.monotonic() - start < CHUNKS * reads.delay_s  # less than one after the other
    for s, d in zip(src, dst):
        assert torch.equal(d.view(torch.int8), s.view(torch.int8))
    assert reads.all_released() and allocated(engine) == 0


def test_a_lookup_of_chunks_already_held_pins_them_again_without_reading(engines, tmp_path):
    engine, _ = stored(engines, tmp_path, read_ahead=3, seed=6)
    assert engine.lookup(TOKENS, lookup_id="a", pin=True) == len(TOKENS)
    reads = ReadsInFlight(backend(engine))
    assert engine.lookup(TOKENS, lookup_id="b", pin=True) == len(TOKENS)
    assert reads.most == 0
    tier = backend(engine)
    engine.lookup_unpin("a")
    assert len(tier._held) == CHUNKS
    engine.lookup_unpin("b")
    assert len(tier._held) == 0 and allocated(engine) == 0
