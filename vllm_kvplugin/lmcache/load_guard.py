# SPDX-License-Identifier: Apache-2.0
"""What a step's loads were to fill, so that a load that raises becomes a reported load error.

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
