# SPDX-License-Identifier: Apache-2.0
"""Loads that always run and never leave unreported garbage: the forward context LMCache needs,
and what a step's loads were to fill, so that a load that raises becomes a reported load error.

Runs in the vLLM worker process. LMCache reports chunks that come back missing
through vLLM's load-error API, but an exception from a storage backend mid-load
(a plugin or remote client that raises instead of returning a miss) escapes
``start_load_kv`` and kills the worker, and with it every request in flight.
The connector catches it instead and reports every block this step's loads
were to fill: vLLM recomputes them (``kv_load_failure_policy="recompute"``) or
fails just those requests (``"fail"``), and never trusts half-written blocks.
"""

from __future__ import annotations

import torch


def blocks_to_load(metadata, block_size: int) -> set[int]:
    """vLLM block ids that the loads in LMCache's step ``metadata`` were to write."""
    blocks: set[int] = set()
    for request in getattr(metadata, "requests", ()):
        spec = request.load_spec
        if spec is None or not spec.can_load:
            continue
        slots = request.slot_mapping[spec.vllm_cached_tokens : spec.lmcache_cached_tokens]
        blocks.update(torch.unique(torch.div(slots, block_size, rounding_mode="floor")).tolist())
    return blocks


class ForwardContextForLoads:
    """The runner's forward context, as LMCache's ``start_load_kv`` must see it to load.

    LMCache 0.5.6 returns from ``start_load_kv`` without loading when
    ``forward_context.attn_metadata is None``, but by then vLLM's scheduler has
    counted the step's hits as computed: a skipped load leaves the request
    running on whatever its blocks held. vllm-gaudi's runner passes such a
    context for every step whose metadata is not LMCache's type (vllm-gaudi
    091bbadd ``hpu_model_runner.py`` ~L4406), and vLLM's runner for steps with
    nothing to forward. LMCache reads nothing else of the attention metadata on
    the non-layer-wise path (the only one this connector allows), so this view
    answers for it and passes every other attribute through.
    """

    def __init__(self, forward_context):
        self._context = forward_context

    @property
    def attn_metadata(self):
        attn_metadata = getattr(self._context, "attn_metadata", None)
        return attn_metadata if attn_metadata is not None else {}

    def __getattr__(self, name):
        return getattr(self._context, name)
