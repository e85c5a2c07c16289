# SPDX-License-Identifier: Apache-2.0
"""The prefill hand-off: which steps wait, for what, how long, and what each side reports.

The waiting is tested on a real LMCacheEngine whose direct-I/O tier writes slowly
(injected at the I/O boundary); the end-to-end hand-off behind vllm-router is
tests/e2e/test_pd_router.py.
"""

import time
from types import SimpleNamespace

import pytest
from tier_helpers import SRC_TABLE, TOKENS, backend, chunk_files, kv, slots

from vllm_kvplugin.lmcache.handoff import HandoffTracker, handoff_timeout_s, wait_for_tier_writes
from vllm_kvplugin.storage.io import PosixIO

WRITE_DELAY_S = 0.4


def request(rid, params=None, prompt_tokens=1000):
    return SimpleNamespace(request_id=rid, kv_transfer_params=params, num_prompt_tokens=prompt_tokens)


def step_request(rid, last_prefill=True, can_save=True):
    return SimpleNamespace(req_id=rid, is_last_prefill=last_prefill, save_spec=SimpleNamespace(can_save=can_save))


def test_a_producer_hands_off_every_request_on_the_step_that_completes_its_prefill():
    tracker = HandoffTracker("kv_producer")
    for rid in ("a", "b", "c"):
        tracker.admitted(request(rid), 0)
    step = [step_request("a"), step_request("b", last_prefill=False), step_request("c", can_save=False),
            step_request("unknown")]
    assert tracker.steps_handoffs(step) == {"a"}
    assert tracker.finished(request("a"), 192) == {"kvplugin": {"handed_off_tokens": 192}}
    assert tracker.steps_handoffs([step_request("a")]) == frozenset()  # forgotten once finished


def test_kv_both_hands_off_only_what_a_router_sends_to_a_decode_instance():
    tracker = HandoffTracker("kv_both")
    tracker.admitted(request("pd", {"do_remote_decode": True, "do_remote_prefill": False}), 0)
    tracker.admitted(request("plain"), 64)
    assert tracker.steps_handoffs([step_request("pd"), step_request("plain")]) == {"pd"}
    assert tracker.finished(request("plain"), 128) == {"kvplugin": {"loaded_tokens": 64}}


def test_a_consumer_reports_what_it_loaded_beside_what_was_handed_off_and_never_hands_off(caplog):
    tracker = HandoffTracker("kv_consumer")
    tracker.admitted(request("d", {"kvplugin": {"handed_off_tokens": 448}}), 448)
    tracker.admitted(request("short", {"kvplugin": {"handed_off_tokens": 448}}), 128)
    tracker.admitted(request("direct"), 0)
    assert tracker.steps_handoffs([step_request("d")]) == frozenset()
    assert tracker.finished(request("d"), 0) == {"kvplugin": {"loaded_tokens": 448, "handed_off_tokens": 448}}
    assert "handed off 448" not in caplog.text
    assert tracker.finished(request("short"), 0) == {"kvplugin": {"loaded_tokens": 128, "handed_off_tokens": 448}}
    assert "handed off 448 prompt tokens, this instance loaded 128" in caplog.text
    assert tracker.finished(request("direct"), 0) == {"kvplugin": {"loaded_tokens": 0}}
    assert tracker.finished(request("never-admitted"), None) is None


@pytest.mark.parametrize("value", ["0", -1, "soon", None])
def test_a_bad_timeout_is_refused(value):
    with pytest.raises(ValueError, match="handoff_timeout_s"):
        handoff_timeout_s({"kvplugin.handoff_timeout_s": value})
    assert handoff_timeout_s({}) == 30.0 and handoff_timeout_s({"kvplugin.handoff_timeout_s": "2.5"}) == 2.5


@pytest.fixture
def slow_writes(monkeypatch):
    """Every chunk write of the direct-I/O tier takes WRITE_DELAY_S longer."""
    write = PosixIO.write

    def slow(self, *args, **kwargs):
        time.sleep(WRITE_DELAY_S)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(PosixIO, "write", slow)


def test_the_wait_returns_once_every_chunk_is_on_disk(engines, tmp_path, slow_writes):
    engine = engines(tmp_path)
    engine.store(TOKENS, kvcaches=kv(seed=1), slot_mapping=slots(SRC_TABLE, 100))
    assert len(chunk_files(tmp_path)) < 3  # LMCache returned with the writes still in flight
    assert wait_for_tier_writes([backend(engine)], 10.0, {"r"})
    assert len(chunk_files(tmp_path)) == 3
    assert engine.lookup(TOKENS) == 96


def test_a_tier_slower_than_the_bound_is_waited_for_no_longer(engines, tmp_path, slow_writes, caplog):
    engine = engines(tmp_path)
    engine.store(TOKENS, kvcaches=kv(seed=2), slot_mapping=slots(SRC_TABLE, 100))
    start = time.monotonic()
    assert not wait_for_tier_writes([backend(engine)], WRITE_DELAY_S / 4, {"r"})
    assert time.monotonic() - start < WRITE_DELAY_S
    assert wait_for_tier_writes([backend(engine)], 10.0, {"r"})  # the writes themselves carry on
    assert len(chunk_files(tmp_path)) == 3

