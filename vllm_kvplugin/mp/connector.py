# SPDX-License-Identifier: Apache-2.0
"""``LMCachePortableConnector`` in LMCache's multiprocess (MP) mode.

vLLM builds this class when the connector's ``kv_connector_extra_config``
holds LMCache's own ``lmcache.mp.*`` keys (see
:meth:`vllm_kvplugin.connector.LMCachePortableConnector.__new__`); it runs in
the engine core (scheduler role) and every worker. The cache lives in a
separately run ``lmcache server``; LMCache's ``LMCacheMPConnector`` does all
of the talking to it, and this subclass adds what the portable connector
promises in-process too:

* the server is asked first, with a short timeout, whether it is there and
  which transfer modes it serves (:mod:`.server_probe`); the worker registers
  with a mode that fits (a CPU worker facing a stock server uses LMCache's
  shared-memory path) or startup fails within seconds naming the server flag
  to add, instead of LMCache's 300 s wait and crash;
* extra-config keys of the in-process mode (tiers, LMCache settings) are
  refused: in MP mode they are the server's flags, and LMCache would
  silently ignore them;
* vLLM's roles, strictly: a ``kv_producer`` never loads (LMCache's MP
  connector would), a ``kv_consumer`` never stores (LMCache already);
* the ``vllm:kvplugin_*`` lookup and hit counters of the in-process mode;
* a request's lookup starts when it arrives (LMCache's ``eager_prefetch``,
  on unless set: :func:`.settings.eager_prefetch`);
* a CPU worker that moves KV itself (``engine_driven``) does it with our
  one-pass mover, LMCache's device plugin :mod:`.device_plugin`.
"""

from __future__ import annotations

import os

from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector, build_parallel_strategy_from_vllm_config
from lmcache.integration.vllm.lmcache_mp_metadata import LMCacheMPRequestState
from lmcache.integration.vllm.mp_server_launcher import is_mp_server_autostart_enabled
from lmcache.logging import init_logger
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from vllm_kvplugin.metrics import KVPluginStats
from vllm_kvplugin.mp.device_plugin import BACKEND_NAME, claim_cpu_transfers
from vllm_kvplugin.mp.server_probe import ENGINE_DRIVEN, ask, choose_transfer_mode
from vllm_kvplugin.mp.settings import MP_PREFIX, check_mp_config, eager_prefetch, server_urls

logger = init_logger(__name__)


class LMCachePortableMPConnector(LMCacheMPConnector):
    """LMCache's MP connector with a fast server check, a fitting transfer mode, strict roles and our counters."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        self._probe_timeout_s = check_mp_config(extra)
        self._urls = server_urls(extra)
        # With autostart, LMCache's worker rank 0 starts the server and waits for it itself.
        if not is_mp_server_autostart_enabled(extra):
            for url in self._urls:
                ask(url, self._probe_timeout_s, modes=False)  # down: an error in seconds, not 300 s
        super().__init__(vllm_config, role, kv_cache_config)
        self._loads = vllm_config.kv_transfer_config.kv_role != "kv_producer"
        self._eager_prefetch = eager_prefetch(extra, self._loads)  # read by LMCache's on_new_request
        self._requested_mode = extra.get(MP_PREFIX + "mp_transfer_mode") or os.environ.get("LMCACHE_MP_TRANSFER_MODE")
        self._kvplugin_stats = KVPluginStats()

    def register_kv_caches(self, kv_caches) -> None:
        """Worker: register with a transfer mode the server serves (or fail now, naming the flag)."""
        first = next(iter(kv_caches.values()))
        device_type = (first[0] if isinstance(first, (list, tuple)) else first).device.type
        answer = ask(self._worker_server_url(), self._probe_timeout_s)
        mode = choose_transfer_mode(answer, device_type, self._requested_mode)
        logger.info("LMCache server at %s serves %s; registering %s KV with %s", answer.url,
                    sorted(answer.transfer_modes), device_type, mode)
        if mode == ENGINE_DRIVEN and device_type == "cpu":
            claim_cpu_transfers()
            logger.info("KV moves between vLLM's blocks and LMCache's chunks through %s (%s)",
                        BACKEND_NAME, "vllm_kvplugin.mp.device_plugin")
        self.worker_adapter._mp_transfer_mode = mode  # read by LMCache when it registers (just below)
        super().register_kv_caches(kv_caches)

    def _worker_server_url(self) -> str:
        """The one server this worker talks to (LMCache's rule: contiguous ranks per server)."""
        strategy = build_parallel_strategy_from_vllm_config(self._vllm_config, len(self._urls))
        return self._urls[strategy.vllm_worker_id // (strategy.vllm_world_size // len(self._urls))]

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """Scheduler: LMCache's lookup; a ``kv_producer`` skips it (and never loads) but still stores."""
        if not self._loads:
            # LMCache stores through the request's tracker; its bypass state means "no lookup,
            # no load, computed locally" and becomes READY (storing) once vLLM allocates.
            self._get_or_create_request_tracker(request).state = LMCacheMPRequestState.BYPASS_LMCACHE
            return 0, False
        return super().get_num_new_matched_tokens(request, num_computed_tokens)

    # -- metrics: the in-process mode's counters ---------------------------------

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        """Scheduler: count one lookup per scheduled waiting request, and its hit."""
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        self._kvplugin_stats.add(lookups=1, lookup_tokens=request.num_tokens, hit_tokens=num_external_tokens)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Worker: LMCache's failed blocks (recomputed by vLLM), counted."""
        failed = super().get_block_ids_with_load_errors()
        self._kvplugin_stats.add(load_failed_blocks=len(failed))
        return failed

    def get_kv_connector_stats(self) -> KVPluginStats | None:
        stats, self._kvplugin_stats = self._kvplugin_stats, KVPluginStats()
        return None if stats.is_empty() else stats

