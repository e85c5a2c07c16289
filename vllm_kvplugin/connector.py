# SPDX-License-Identifier: Apache-2.0
"""vLLM KV connectors that store and load prompt KV through LMCache on any torch device.

vLLM imports this module in the API server (config validation), the engine
core (scheduler role) and every worker (worker role); importing it has no side
effects. One class, two instances: ``role=SCHEDULER`` in the engine core
decides what to load and save, ``role=WORKER`` moves the bytes.

All of LMCache's vLLM adapter logic (lookup, load/save decisions, request
tracking, async save) is reused as is: these classes subclass LMCache's own
dynamic connector and only make sure that, on the worker, the LMCache engine it
adopts carries the portable KV mover (:mod:`vllm_kvplugin.lmcache.engine`).
"""

from __future__ import annotations

import torch  # noqa: F401  - must precede lmcache (its native lib dlopens libc10)
from lmcache.integration.vllm.lmcache_connector_v1 import LMCacheConnectorV1Dynamic
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from vllm_kvplugin.lmcache.engine import create_worker_engine, prepare_config
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector


class LMCachePortableConnector(LMCacheConnectorV1Dynamic):
    """LMCache KV offload through the portable KV mover (CPU, HPU, ROCm; CUDA too).

    Configured like LMCache's own connector: LMCache settings come from
    ``LMCACHE_*`` variables, ``LMCACHE_CONFIG_FILE`` or ``lmcache.<key>``
    entries of ``kv_connector_extra_config``.

    Raises:
        ValueError: at construction, for LMCache settings the portable path cannot honour.
        RuntimeError: at ``register_kv_caches``, if LMCache failed to start (LMCache
            itself would only log it and silently recompute every prompt).
    """

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        if role == KVConnectorRole.WORKER:
            self._portable_engine = create_worker_engine(vllm_config, kv_cache_config)
        else:
            prepare_config(vllm_config)  # validate in the engine core too: fail before workers load
        super().__init__(vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.WORKER and self._adapter.lmcache_engine is not self._portable_engine:
            raise RuntimeError(
                "LMCache did not adopt the portable engine: "
                + (self._adapter._manager._init_failed_reason or "unknown reason")
            )

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
        if not engine.is_healthy():
            raise RuntimeError(
                "LMCache failed to initialise its storage; see the LMCache error above. "
                "Refusing to start rather than silently recomputing every prompt."
            )


class LMCacheHPUConnector(LMCachePortableConnector):
    """The portable connector under its HPU name (vllm-gaudi's ``(K, V)`` tensors included).

    Always the portable path, whatever the platform: on CUDA,
    ``LMCachePortableConnector`` routes to LMCache's native kernels instead.
    """
