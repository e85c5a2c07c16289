# SPDX-License-Identifier: Apache-2.0
"""vLLM KV connectors that store and load prompt KV through LMCache on any torch device.

vLLM imports this module in the API server (config validation), the engine
core (scheduler role) and every worker (worker role); importing it has no side
effects. One class, two instances: ``role=SCHEDULER`` in the engine core
decides what to load and save, ``role=WORKER`` moves the bytes.

All of LMCache's vLLM adapter logic (lookup, load/save decisions, request
tracking) is reused as is: these classes subclass LMCache's own dynamic
connector and only add what the portable path needs: on the worker, the
LMCache engine it adopts carries the portable KV mover
(:mod:`vllm_kvplugin.lmcache.engine`); a load that raises becomes a reported
load error instead of a dead engine (:mod:`vllm_kvplugin.lmcache.load_guard`);
stores can run behind the forward pass under vLLM's asynchronous save contract
(:mod:`vllm_kvplugin.lmcache.async_save`); a prefill instance answers only
once the KV it hands to a decode instance is readable
(:mod:`vllm_kvplugin.lmcache.handoff`); vLLM's producer/consumer roles are
honoured strictly; and the counters of :mod:`vllm_kvplugin.metrics` reach
vLLM's stats.
"""

from __future__ import annotations

import threading
import time

import torch  # noqa: F401  - must precede lmcache (its native lib dlopens libc10)
from lmcache.integration.vllm.lmcache_connector_v1 import LMCacheConnectorV1Dynamic
from lmcache.logging import init_logger  # vLLM's logger drops INFO from modules outside "vllm."
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from vllm_kvplugin.lmcache.async_save import BackgroundSaver
from vllm_kvplugin.lmcache.block_tail import LookupView, store_tails, whole_block_tokens
from vllm_kvplugin.lmcache.chunk_tier import ChunkTier
from vllm_kvplugin.lmcache.engine import create_worker_engine
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector
from vllm_kvplugin.lmcache.handoff import HandoffTracker, handoff_timeout_s, wait_for_tier_writes
from vllm_kvplugin.lmcache.load_guard import ForwardContextForLoads, blocks_to_load
from vllm_kvplugin.lmcache.settings import prepare_config, save_mode
from vllm_kvplugin.lmcache.step_metadata import PortableConnectorMetadata
from vllm_kvplugin.mp.settings import is_mp_config
from vllm_kvplugin.metrics import KVPluginPromMetrics, KVPluginStats, WorkerStatsSampler
from vllm_kvplugin.storage.directory import ChunkDirectory

logger = init_logger(__name__)


class LMCachePortableConnector(LMCacheConnectorV1Dynamic):
    """LMCache KV offload through the portable KV mover (CPU, HPU, ROCm; CUDA too).

    Configured like LMCache's own connector: LMCache settings come from
    ``LMCACHE_*`` variables, ``LMCACHE_CONFIG_FILE`` or ``lmcache.<key>``
    entries of ``kv_connector_extra_config``.

    With LMCache's own ``lmcache.mp.*`` keys in ``kv_connector_extra_config``
    the same name runs LMCache's multiprocess mode instead: vLLM gets a
    :class:`vllm_kvplugin.mp.connector.LMCachePortableMPConnector`, which
    talks to a separately run ``lmcache server``.

    Raises:
        ValueError: at construction, for LMCache settings the portable path cannot honour.
        RuntimeError: at ``register_kv_caches``, if LMCache failed to start (LMCache
            itself would only log it and silently recompute every prompt).
    """

    def __new__(cls, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        """The in-process connector, or (``lmcache.mp.*`` keys) LMCache's MP mode under the same name."""
        if is_mp_config(vllm_config.kv_transfer_config.kv_connector_extra_config):
            from vllm_kvplugin.mp.connector import LMCachePortableMPConnector

            return LMCachePortableMPConnector(vllm_config, role, kv_cache_config)  # not ours: no __init__ again
        return super().__new__(cls)

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        if role == KVConnectorRole.WORKER:
            self._portable_engine = create_worker_engine(vllm_config, kv_cache_config)
        else:
            prepare_config(vllm_config)  # validate in the engine core too: fail before workers load
        super().__init__(vllm_config, role, kv_cache_config)
        # vLLM's roles, strictly: a prefill instance stores and never loads (LMCache 0.5.6
        # would let a producer load its own chunks back); a consumer never stores (LMCache).
        self._loads = vllm_config.kv_transfer_config.kv_role != "kv_producer"
        self._block_size = vllm_config.cache_config.block_size
        self._failed_loads: set[int] = set()  # blocks of loads that raised (load_guard)
        self._async_save = save_mode(vllm_config) == "async"
        self._kept: set[str] = set()  # engine core: finished requests whose blocks wait for a save
        self._saver = None
        if self._async_save and role == KVConnectorRole.WORKER:
            self._saver = BackgroundSaver(self._save_step)
            logger.info("KV stores run on a background thread (kvplugin.save_mode=async)")
        self._save_thread = threading.local()  # worker: the step the save thread is storing
        transfer = vllm_config.kv_transfer_config
        self._handoffs = HandoffTracker(transfer.kv_role)  # engine core
        self._handoff_timeout_s = handoff_timeout_s(transfer.kv_connector_extra_config or {})  # worker
        if role == KVConnectorRole.WORKER and self._adapter.lmcache_engine is not self._portable_engine:
            raise RuntimeError(
                "LMCache did not adopt the portable engine: "
                + (self._adapter._manager._init_failed_reason or "unknown reason")
            )
        self._kvplugin_stats = KVPluginStats()
        if role == KVConnectorRole.WORKER:
            # tokens once per engine (global rank 0); bytes and seconds from every worker
            self._stats_sampler = WorkerStatsSampler(self._portable_engine.metadata.worker_id == 0)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """Scheduler: LMCache's lookup of the request's tokens up to its last whole block (block_tail)."""
        if not self._loads:
            return 0, False
        if self._stores_tails:
            request = LookupView(request, self._block_size)
        return super().get_num_new_matched_tokens(request, num_computed_tokens)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        """Worker: LMCache's load of the step's hits, whatever forward context the runner built.

        The scheduler has already counted the hits as computed, so the load must
        happen: LMCache 0.5.6 skips it when the context has no attention metadata,
        which vllm-gaudi's runner builds for any step metadata but LMCache's type
        and vLLM's runner for steps without a forward (``ForwardContextForLoads``).
        If the load raises, this step's blocks become load errors.
        """
        try:
            super().start_load_kv(ForwardContextForLoads(forward_context), **kwargs)
        except Exception:
            failed = blocks_to_load(self._get_connector_metadata(), self._block_size)
            logger.exception("KV load failed; %d blocks will be recomputed or their requests failed", len(failed))
            self._failed_loads |= failed

    def wait_for_save(self) -> None:
        """Worker: LMCache's store, now or (async save mode) queued behind the forward pass.

        A step that completes a prefill handed to a decode instance returns
        only once its stores are written (:mod:`vllm_kvplugin.lmcache.handoff`).
        """
        metadata = self._get_connector_metadata()
        handoff = getattr(metadata, "handoff", frozenset())
        deadline = time.monotonic() + self._handoff_timeout_s
        if self._saver is None:
            self._save_step(metadata)
        else:
            self._saver.submit(metadata)
            if handoff:
                self._saver.drain(self._handoff_timeout_s)  # a late store is waited for no longer than a late write
        if handoff:
            manager = self._portable_engine.storage_manager
            tiers = [b for b in manager.storage_backends.values() if isinstance(b, ChunkTier)]
            wait_for_tier_writes(tiers, max(0.0, deadline - time.monotonic()), handoff)

    def _save_step(self, metadata) -> None:
        """Worker (forward or save thread): store one step; if it raises, the chunks stay uncached."""
        self._save_thread.metadata = metadata
        try:
            super().wait_for_save()
        except Exception:
            logger.exception("KV store failed; those chunks stay uncached")
        finally:
            self._save_thread.metadata = None

    # -- the step's metadata and the asynchronous save contract (async_save) --

    def build_connector_meta(self, scheduler_output) -> PortableConnectorMetadata:
        """Engine core: LMCache's step metadata, plus which requests were kept, preempted and handed off."""
        kept, self._kept = frozenset(self._kept), set()
        lmcache_metadata = super().build_connector_meta(scheduler_output)
        if self._stores_tails:
            store_tails(lmcache_metadata.requests, self._adapter._request_trackers,
                        scheduler_output.num_scheduled_tokens, self._block_size)
        return PortableConnectorMetadata.extend(
            lmcache_metadata,
            kept=kept,
            preempted=frozenset(scheduler_output.preempted_req_ids or ()),
            handoff=self._handoffs.steps_handoffs(lmcache_metadata.requests),
        )

    def bind_connector_metadata(self, connector_metadata: PortableConnectorMetadata) -> None:
        """Worker, before the step's loads and forward: preempted requests' saves must be done."""
        super().bind_connector_metadata(connector_metadata)
        # Per-step state of LMCache's adapter, reset as vLLM's in-tree LMCache connector
        # does here (LMCache's dynamic connector does not; layer-wise mode is refused anyway).
        self._adapter.current_layer = 0
        self._adapter.layerwise_retrievers = []
        if self._saver is not None:
            self._saver.before_step(connector_metadata)

    def _get_connector_metadata(self):
        """LMCache's metadata of the step being served (on the save thread: of the step it stores)."""
        saving = getattr(self._save_thread, "metadata", None)
        return saving if saving is not None else super()._get_connector_metadata()

    def request_finished(self, request, block_ids: list[int]):
        """Engine core: with async saves, keep the blocks until the workers report the save done.

        The reply's ``kv_transfer_params`` gain our hand-off report: the prompt
        tokens a prefill instance stored for its decode instance, the tokens a
        loading instance loaded.
        """
        tracker = self._adapter._request_trackers.get(request.request_id)  # gone at the next step
        delay_free, params = super().request_finished(request, block_ids)
        if self._async_save and block_ids:
            self._kept.add(request.request_id)
            delay_free = True
        stored = whole_block_tokens(tracker.num_saved_tokens, self._block_size) if tracker else None
        report = self._handoffs.finished(request, stored)
        if report:
            params = {**(params or {}), **report}
        return delay_free, params

    def get_finished(self, finished_req_ids: set[str]):
        """Worker: kept requests whose saves are done, for vLLM to free their blocks."""
        sending, recving = super().get_finished(finished_req_ids)
        if self._saver is not None:
            sending = set(sending or ()) | self._saver.finished(finished_req_ids)
        return sending or None, recving

    def shutdown(self):
        if self._saver is not None:
            self._saver.close()  # queued stores complete: KV computed before shutdown is kept
        return super().shutdown()

    @property
    def _stores_tails(self) -> bool:
        """Whether prompt tails are stored and looked up as whole blocks (block_tail): off where the user
        set ``save_unfull_chunk: false``, LMCache's whole-chunks-only default."""
        return self._adapter.config.save_unfull_chunk

    @property
    def _adapter(self):
        """LMCache's ``LMCacheConnectorV1Impl`` (its parent class names it ``_lmcache_engine``)."""
        return self._lmcache_engine

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        engine = self._portable_engine
        mover = engine.gpu_connector
        assert isinstance(mover, PortableGPUConnector)
        mover.register(kv_caches.values())  # fail on an unsupported layout now, not mid-request
        super().register_kv_caches(kv_caches)
        # Only a failed initialisation blocks startup. A remote tier that is down right
        # now (LMCache's health monitor) must not: vLLM serves, recomputes, and
        # LMCache reconnects when the tier comes back.
        if self._adapter._manager._init_failed:
            raise RuntimeError(
                "LMCache failed to initialise its storage; see the LMCache error above. "
                "Refusing to start rather than silently recomputing every prompt."
            )
        # LMCache only logs a storage plugin that fails to build and runs without it.
        missing = sorted(set(engine.config.storage_plugins or ()) - set(engine.storage_manager.storage_backends))
        if missing:
            raise RuntimeError(
                f"LMCache storage plugin(s) {missing} failed to start; see the LMCache error above. "
                "Refusing to start without the configured tier."
            )

    # -- metrics (vllm_kvplugin.metrics) -------------------------------------

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        """Scheduler: count one lookup per scheduled waiting request, and its hit."""
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        self._handoffs.admitted(request, num_external_tokens)
        self._kvplugin_stats.add(
            lookups=1, lookup_tokens=request.num_tokens, hit_tokens=num_external_tokens
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Worker: LMCache's failed blocks, counted."""
        failed = super().get_block_ids_with_load_errors() | self._failed_loads
        self._failed_loads = set()
        self._kvplugin_stats.add(load_failed_blocks=len(failed))
        return failed

    def get_kv_connector_stats(self) -> KVPluginStats | None:
        """Both roles, once per step: this interval's counts (``None`` when there are none)."""
        if self._role == KVConnectorRole.WORKER:
            self._kvplugin_stats.add(**self._stats_sampler.sample(self._worker_totals()))
        stats, self._kvplugin_stats = self._kvplugin_stats, KVPluginStats()
        return None if stats.is_empty() else stats

    def _worker_totals(self) -> dict[str, float]:
        totals = self._portable_engine.gpu_connector.totals.snapshot()
        manager = getattr(self._portable_engine, "storage_manager", None)  # set at post_init
        for backend in getattr(manager, "storage_backends", {}).values():
            if isinstance(getattr(backend, "directory", None), ChunkDirectory):
                totals["directio_evictions"] = backend.directory.evictions
        return totals

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config=None) -> bool:
        """vLLM 0.33+: no. After a wake LMCache's adapter would still hold the old KV tensors
        (it implements neither ``unregister_kv_caches`` nor ``restore_kv_caches``), so vLLM
        refuses the combination at startup; on 0.32, which never asks, ``check_model_supported``
        refuses it."""
        return False

    @classmethod
    def build_kv_connector_stats(cls, data=None) -> KVPluginStats:
        """API server: rebuild the engine core's stats dict (vLLM's log line)."""
        return KVPluginStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        """API server: the ``vllm:kvplugin_*`` Prometheus counters."""
        return KVPluginPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


class LMCacheHPUConnector(LMCachePortableConnector):
    """The portable connector under its HPU name (vllm-gaudi's ``(K, V)`` tensors included).

    Always the portable path, whatever the platform: on CUDA,
    ``LMCachePortableConnector`` routes to LMCache's native kernels instead.
    """
