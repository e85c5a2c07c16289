# SPDX-License-Identifier: Apache-2.0
"""The prompt tail as whole blocks (vllm_kvplugin.lmcache.block_tail), on LMCache's own request specs.

End to end (a repeated off-grid prompt gets every whole block back, byte-exact
loads into exactly the counted blocks, damaged partial chunks are misses):
tests/e2e/test_llm.py, test_damage_under_defaults.py, tests/vllm/test_runner_contracts.py.
"""

from types import SimpleNamespace

import pytest
from lmcache.integration.vllm.vllm_v1_adapter import LoadSpec, ReqMeta, RequestTracker

from vllm_kvplugin.lmcache.block_tail import LookupView, trim_to_whole_blocks

BLOCK, CHUNK = 32, 256


def last_prefill_spec(tokens: int, saved: int = 0, cached: int = 0) -> ReqMeta:
    """LMCache's spec for a prompt's whole prefill in one step, as our config makes it (partial chunks kept)."""
    blocks = list(range(-(-tokens // BLOCK)))
    tracker = RequestTracker(req_id="r", prompt_len=tokens, token_ids=list(range(tokens)),
                             allocated_block_ids=blocks, num_saved_tokens=saved)
    load = LoadSpec(vllm_cached_tokens=0, lmcache_cached_tokens=cached, can_load=cached > 0) if cached else None
    return ReqMeta.from_request_tracker(tracker, BLOCK, CHUNK, load_spec=load, discard_partial_chunks=False)


@pytest.mark.parametrize("tokens, stored", [(2900, 2880), (2880, 2880), (2816, 2816), (31, 0), (257, 256)])
def test_a_finished_prefill_is_stored_up_to_its_last_whole_block(tokens, stored):
    spec = last_prefill_spec(tokens)
    assert len(spec.token_ids) == tokens  # LMCache alone would store the partial block
    trim_to_whole_blocks([spec], BLOCK)
    assert len(spec.token_ids) == len(spec.slot_mapping) == stored
    assert spec.token_ids == list(range(stored)) and spec.slot_mapping.tolist() == list(range(stored))


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
