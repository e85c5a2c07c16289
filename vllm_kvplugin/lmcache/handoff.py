# SPDX-License-Identifier: Apache-2.0
"""Disaggregated prefill/decode through a shared tier: the prefill answers once its KV is readable.

In PD serving a router (``vllm-router --vllm-pd-disaggregation``, xpyd-proxy)
sends each request to a prefill instance with ``max_tokens=1`` and, as soon as
that reply arrives, to a decode instance, which looks the prompt up in the
shared tier (direct-I/O directory, Redis). Without care the decode instance's
lookup races the prefill instance's store: LMCache hands chunks to the tiers'
writer threads and returns, and with ``kvplugin.save_mode: async`` the store
itself runs behind the forward pass. A slow disk, a remote tier or a long
prompt then turns the hand-off into a miss, and the decode instance silently
recomputes the whole prefill.

So a step that completes a handed-off request's prefill (every request of a
``kv_producer``; requests a router marks ``do_remote_decode`` on ``kv_both``)
returns only once its stores are in the tiers: the worker runs the store (or
waits for its queued one) and then waits for the tiers' writes, bounded by
``kvplugin.handoff_timeout_s``. vLLM emits a request's reply only after its
step returns, so the decode instance's lookup always follows the writes. A
tier that stays slower than the bound costs a warning and, at worst, a miss on
the decode side, never a hang or a failed request.

Both sides say what happened in the reply's ``kv_transfer_params`` (which
routers forward from prefill to decode): the prefill instance the prompt tokens
it handed off, the decode instance the tokens it loaded.

The engine core (scheduler role) decides which steps hand off
(:class:`HandoffTracker`); the worker waits (:func:`wait_for_tier_writes`).
"""

from __future__ import annotations

import time

from lmcache.logging import init_logger

logger = init_logger(__name__)

PARAMS_KEY = "kvplugin"  # our entry in a request's kv_transfer_params
TIMEOUT_KEY = "kvplugin.handoff_timeout_s"
DEFAULT_TIMEOUT_S = 30.0


def handoff_timeout_s(extra: dict) -> float:
    """``kvplugin.handoff_timeout_s`` of ``kv_connector_extra_config``, checked.

    Raises:
        ValueError: not a positive number.
    """
    value = extra.get(TIMEOUT_KEY, DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_KEY} must be a positive number of seconds, got {value!r}")
    return seconds


class HandoffTracker:
    """Engine core: which requests hand their prompt KV to another instance, and what each side reports.

    Args:
        kv_role: this instance's vLLM ``kv_role``.
    """

    def __init__(self, kv_role: str):
        self._role = kv_role
        self._handing_off: set[str] = set()
        self._loaded: dict[str, int] = {}  # loading side: tokens its lookup promised, by request
        self._announced: dict[str, int] = {}  # loading side: tokens the prefill instance said it handed off

    def admitted(self, request, num_external_tokens: int) -> None:
        """A request was scheduled with ``num_external_tokens`` to load (``update_state_after_alloc``)."""
        params = getattr(request, "kv_transfer_params", None) or {}
        if self._role == "kv_producer" or (self._role == "kv_both" and params.get("do_remote_decode")):
            self._handing_off.add(request.request_id)
        if self._role != "kv_producer":
            self._loaded[request.request_id] = num_external_tokens
            announced = (params.get(PARAMS_KEY) or {}).get("handed_off_tokens")
            if isinstance(announced, int):
                self._announced[request.request_id] = announced

    def steps_handoffs(self, lmcache_requests) -> frozenset[str]:
        """Handed-off requests whose prompt KV this step completes and stores."""
        return frozenset(
            r.req_id for r in lmcache_requests
            if r.req_id in self._handing_off and r.is_last_prefill
            and r.save_spec is not None and r.save_spec.can_save
        )

    def finished(self, request, stored_tokens: int | None) -> dict | None:
        """Our ``kv_transfer_params`` for a finished request's reply (``None``: nothing to say).

        Args:
            stored_tokens: prompt tokens LMCache stored for it (its tracker's count), if known.
        """
        rid = request.request_id
        report = {}
        if rid in self._handing_off and stored_tokens is not None:
            report["handed_off_tokens"] = stored_tokens
        loaded, announced = self._loaded.pop(rid, None), self._announced.pop(rid, None)
        if loaded is not None:
            report["loaded_tokens"] = loaded
        if announced is not None:  # a decode instance repeats what its prefill instance announced
            report["handed_off_tokens"] = announced
            if loaded is not None and loaded < min(announced, request.num_prompt_tokens - 1):
                logger.warning(
                    "request %s: the prefill instance handed off %d prompt tokens, this instance loaded %d "
                    "(the rest was recomputed): do both instances share the tier, chunk size and model?",
                    rid, announced, loaded,
                )
        self._handing_off.discard(rid)
        return {PARAMS_KEY: report} if report else None


def wait_for_tier_writes(tiers, timeout_s: float, requests) -> bool:
    """Worker: block until every write the ``tiers`` have in flight is done; False if ``timeout_s`` passed.

    Args:
        tiers: the worker's :class:`~vllm_kvplugin.lmcache.chunk_tier.ChunkTier` instances.
        requests: the handed-off requests of the step (for the warning).
    """
    deadline = time.monotonic() + timeout_s
    for tier in tiers:
        if not tier.wait_for_stores(max(0.0, deadline - time.monotonic())):
            logger.warning(
                "prefill hand-off: tier %s still writing after %.0f s (kvplugin.handoff_timeout_s); "
                "requests %s are answered anyway and their decode instance may recompute them",
                tier, timeout_s, sorted(requests),
            )
            return False
    return True
