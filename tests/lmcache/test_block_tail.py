# SPDX-License-Identifier: Apache-2.0
"""The prompt tail as whole blocks (vllm_kvplugin.lmcache.block_tail), on LMCache's own request specs.

End to end (a repeated off-grid prompt gets every whole block back, byte-exact
loads into exactly the counted blocks, damaged partial chunks are misses):
tests/e2e/test_llm.py, test_damage_under_defaults.py, tests/vllm/test_runner_contracts.py.
"""

from types import SimpleNamespace

import pytest
from lmcache.integration.vllm.vllm_v1_adapter import LoadSpec, ReqMeta, RequestTracker

from vllm_kvplugin.lmcache.block_tail import LookupView, store_tails, trim_to_whole_blocks

BLOCK, CHUNK = 32, 256


def tracker(prompt: int, scheduled: int | None = None, saved: int = 0, **kw) -> RequestTracker:
    """LMCache's tracker of a request whose first ``scheduled`` prompt tokens are computed by this step;
    its blocks are numbered backwards so that slots are not token positions."""
    blocks = list(reversed(range(100, 100 + -(-prompt // BLOCK))))
    return RequestTracker(req_id="r", prompt_len=prompt, token_ids=list(range(scheduled or prompt)),
                          allocated_block_ids=blocks, num_saved_tokens=saved, **kw)


def last_prefill_spec(tokens: int, saved: int = 0, cached: int = 0) -> ReqMeta:
    """LMCache's spec for a prompt's whole prefill in one step, as our config makes it (partial chunks kept)."""
    load = LoadSpec(vllm_cached_tokens=0, lmcache_cached_tokens=cached, can_load=cached > 0) if cached else None
    return ReqMeta.from_request_tracker(tracker(tokens, saved=saved), BLOCK, CHUNK, load_spec=load,
                                        discard_partial_chunks=False)


def slots(tokens: int, t: RequestTracker) -> list[int]:
    return [t.allocated_block_ids[i // BLOCK] * BLOCK + i % BLOCK for i in range(tokens)]


@pytest.mark.parametrize("tokens, stored", [(2900, 2880), (2880, 2880), (2816, 2816), (31, 0), (257, 256)])
def test_a_finished_prefill_is_stored_up_to_its_last_whole_block(tokens, stored):
    spec = last_prefill_spec(tokens)
    assert len(spec.token_ids) == tokens  # LMCache alone would store the partial block
    trim_to_whole_blocks([spec], BLOCK)
    assert len(spec.token_ids) == len(spec.slot_mapping) == stored
    assert spec.token_ids == list(range(stored))


def test_trimming_never_shortens_the_load_of_the_same_step():
    spec = last_prefill_spec(2900, saved=2880, cached=2880)  # the lookup saw whole blocks
    trim_to_whole_blocks([spec], BLOCK)
    assert len(spec.token_ids) >= spec.load_spec.lmcache_cached_tokens


def test_the_lookup_sees_whole_blocks_and_everything_else_of_the_request():
    request = SimpleNamespace(request_id="r", all_token_ids=list(range(2900)), num_tokens=2900, priority=3)
    view = LookupView(request, BLOCK)
    assert view.all_token_ids == list(range(2880))
    assert (view.request_id, view.num_tokens, view.priority) == ("r", 2900, 3)
    assert LookupView(SimpleNamespace(all_token_ids=list(range(64))), BLOCK).all_token_ids == list(range(64))


def test_a_prefill_split_over_steps_gets_its_tail_stored_in_the_step_that_finishes_it():
    """LMCache stores nothing in that step (no chunk boundary crossed since its last store): a spec is added."""
    t = tracker(333, saved=256)
    assert ReqMeta.from_request_tracker(t, BLOCK, CHUNK, discard_partial_chunks=False) is None  # LMCache's skip
    requests = []
    store_tails(requests, {"r": t}, ["r"], BLOCK)
    (spec,) = requests
    assert spec.is_last_prefill and spec.save_spec.can_save and spec.save_spec.skip_leading_tokens == 256
    assert spec.token_ids == list(range(320)) and spec.slot_mapping.tolist() == slots(320, t)
    assert spec.load_spec is None and t.num_saved_tokens == 320
    again = []
    store_tails(again, {"r": t}, ["r"], BLOCK)  # the next (decode) step: stored already
    assert again == []


def test_a_request_that_loaded_stores_its_tail_too():
    t = tracker(2900, saved=2816)  # the lookup found the whole chunks only
    load = LoadSpec(vllm_cached_tokens=0, lmcache_cached_tokens=2816, can_load=True)
    spec = ReqMeta.from_request_tracker(t, BLOCK, CHUNK, load_spec=load, discard_partial_chunks=False)
    assert not spec.save_spec.can_save  # LMCache: no chunk boundary crossed
    requests = [spec]
    store_tails(requests, {"r": t}, ["r"], BLOCK)
    assert requests == [spec] and spec.save_spec.can_save and spec.save_spec.skip_leading_tokens == 2816
    assert len(spec.token_ids) == 2880 and spec.load_spec.lmcache_cached_tokens == 2816


@pytest.mark.parametrize("case", ["consumer", "request skip_save", "prompt not finished", "tail stored",
                                  "no whole block past the chunks"])
def test_no_tail_store_where_none_is_due(case):
    t = {"consumer": lambda: tracker(333, saved=256, skip_save=True),
         "request skip_save": lambda: tracker(333, saved=256, request_configs={"lmcache.skip_save": True}),
         "prompt not finished": lambda: tracker(333, scheduled=288, saved=256),
         "tail stored": lambda: tracker(333, saved=320),
         "no whole block past the chunks": lambda: tracker(270, saved=256)}[case]()
    requests = []
    store_tails(requests, {"r": t}, ["r", "not-tracked"], BLOCK)
    assert requests == []
