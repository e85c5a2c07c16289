# SPDX-License-Identifier: Apache-2.0
"""A pinned lookup (the scheduler's promise) verifies direct-I/O chunks and holds them for the load.

Real LMCacheEngine, real files: what the lookup promised loads byte-exact even
if the files are damaged or deleted after it; what fails its checks before the
lookup is never promised; and holds end with their pins (no host memory kept).
"""

import os
import time
from pathlib import Path

from tier_helpers import DST_TABLE, SRC_TABLE, TOKENS, assert_loaded, backend, chunk_files, kv, settle, slots

from vllm_kvplugin.lmcache.held_chunks import HeldChunks


def stored_engine(engines, tmp_path, seed):
    engine = engines(tmp_path)
    src = kv(seed=seed)
    engine.store(TOKENS, kvcaches=src, slot_mapping=slots(SRC_TABLE, 100))
    assert settle(engine, TOKENS, 96) == 96
    return engine, src


def chunk_files_in_order(engine):
    """The chunk files of ``TOKENS``, first chunk first."""
    names = [key.to_string() for _, _, key in engine.token_database.process_tokens(TOKENS)]
    return [Path(backend(engine).directory.lookup(name)) for name in names]


def test_what_a_lookup_promised_loads_even_if_every_file_is_damaged_after_it(engines, tmp_path):
    engine, src = stored_engine(engines, tmp_path, seed=11)
    assert engine.lookup(TOKENS, lookup_id="req", pin=True) == 96
    assert len(backend(engine)._held) == 3
    files = chunk_files(tmp_path)
    os.truncate(files[0], 100)
    os.unlink(files[1])
    files[2].write_bytes(b"\0" * files[2].stat().st_size)
    dst = kv()
    assert int(engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=slots(DST_TABLE, 100), req_id="req").sum()) == 96
    assert_loaded(src, dst)
    engine.lookup_unpin("req")
    assert len(backend(engine)._held) == 0
    assert backend(engine).directory._pinned == {}


def test_a_chunk_damaged_before_the_lookup_is_never_promised(engines, tmp_path):
    engine, src = stored_engine(engines, tmp_path, seed=12)
    files = chunk_files_in_order(engine)
    raw = bytearray(files[1].read_bytes())
    raw[-5] ^= 0xFF
    files[1].write_bytes(bytes(raw))
    assert engine.lookup(TOKENS, lookup_id="req", pin=True) == 32  # chunk 0 only
    assert not files[1].exists()  # discarded at lookup
    dst = kv()
    assert int(engine.retrieve(TOKENS[:32], kvcaches=dst, slot_mapping=slots(DST_TABLE, 32), req_id="req").sum()) == 32
    assert_loaded(src, dst, blocks=2)
    engine.lookup_unpin("req")
    assert len(backend(engine)._held) == 0  # chunk 2, read beside chunk 1, was released at the lookup
    assert backend(engine).directory._pinned == {}


def test_two_lookups_of_one_chunk_share_a_hold_until_both_unpin(engines, tmp_path):
    engine, _ = stored_engine(engines, tmp_path, seed=13)
    assert engine.lookup(TOKENS, lookup_id="a", pin=True) == 96
    assert engine.lookup(TOKENS, lookup_id="b", pin=True) == 96
    assert len(backend(engine)._held) == 3
    engine.lookup_unpin("a")
    assert len(backend(engine)._held) == 3
    engine.lookup_unpin("b")
    assert len(backend(engine)._held) == 0


class FakeObj:
    def __init__(self):
        self.refs = 1

    def ref_count_up(self):
        self.refs += 1

    def ref_count_down(self):
        self.refs -= 1


def test_held_chunks_hand_out_references_and_release_old_holds():
    released = []
    held = HeldChunks(on_release=released.append, max_age_s=0.05)
    a = FakeObj()
    held.add("a", a)
    assert held.pin("a") and not held.pin("b")
    taken = held.take("a")
    assert taken is a and a.refs == 2  # the load's reference and the hold's
    taken.ref_count_down()
    assert not held.unpin("a") and held.unpin("a")  # two pins
    assert a.refs == 0 and released == ["a"]
    old = FakeObj()
    held.add("old", old)
    time.sleep(0.1)
    held.add("new", FakeObj())  # adding sweeps holds past their age
    assert old.refs == 0 and "old" in released and held.has("new") and not held.has("old")
    held.clear()
    assert len(held) == 0 and released[-1] == "new"
