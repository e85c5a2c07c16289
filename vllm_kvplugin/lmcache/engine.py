# SPDX-License-Identifier: Apache-2.0
"""Build LMCache's engine around the portable KV mover, without patching LMCache.

Runs in the engine core (scheduler role: configuration only) and in every vLLM
worker (worker role: the engine itself).

LMCache's vLLM adapter creates its engine through ``VllmServiceFactory``, which
calls ``CreateGPUConnector`` — CUDA, XPU, MUSA and HPU only, and no way to plug
in another (REFERENCE §5). But the factory first returns an engine already
registered under LMCache's engine name. So on the worker we build that engine
first, through :class:`PortableServiceFactory` (a ``VllmServiceFactory`` whose
engine carries our mover), and LMCache's adapter then adopts it with all of its
own lookup, request-tracking and save/load logic unchanged. What configurations
it accepts is :mod:`vllm_kvplugin.lmcache.settings`.
"""

from __future__ import annotations

import dataclasses

import torch
from lmcache.integration.vllm.utils import ENGINE_NAME
from lmcache.integration.vllm.vllm_service_factory import VllmServiceFactory
from lmcache.logging import init_logger
from lmcache.v1.cache_engine import LMCacheEngine, LMCacheEngineBuilder

from vllm_kvplugin import KV_FORMAT_VERSION
from vllm_kvplugin.devices import device_ops
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector
from vllm_kvplugin.lmcache.settings import huge_pages_enabled, prepare_config

logger = init_logger(__name__)


def layout_fingerprint(vllm_config, kv_cache_config=None) -> str:
    """Everything besides LMCache's own key fields that decides a stored chunk's bytes.

    LMCache keys chunks by model name, world size, rank, token hash and dtype
    only; our bytes also depend on the KV layout, the block size, the device's
    packing and our format version.
    """
    layout = getattr(kv_cache_config, "kv_cache_layout", None) or vllm_config.cache_config.kv_cache_layout
    device_type = torch.device(vllm_config.device_config.device).type
    return "kvplugin{}/{}/{}/bs{}".format(
        KV_FORMAT_VERSION,
        device_ops(device_type).layout_tag(),
        layout or "default-layout",
        vllm_config.cache_config.block_size,
    )


class PortableServiceFactory(VllmServiceFactory):
    """``VllmServiceFactory`` whose worker engine moves KV with :class:`PortableGPUConnector`.

    Its metadata's ``model_name`` carries :func:`layout_fingerprint`, which puts the
    fingerprint into every cache key the engine makes.
    """

    def __init__(self, lmcache_config, vllm_config, role: str, fingerprint: str):
        super().__init__(lmcache_config, vllm_config, role)
        self.fingerprint = fingerprint

    def get_or_create_metadata(self):
        if self.metadata is None:
            metadata = super().get_or_create_metadata()
            self.metadata = dataclasses.replace(
                metadata, model_name=f"{metadata.model_name}@{self.fingerprint}"
            )
        return self.metadata

    def get_or_create_lmcache_engine(self) -> LMCacheEngine | None:
        if self.role != "worker":
            return super().get_or_create_lmcache_engine()
        existing = LMCacheEngineBuilder.get(ENGINE_NAME)
        if existing is not None:
            if not isinstance(existing.gpu_connector, PortableGPUConnector):
                raise RuntimeError(
                    f"an LMCache engine {ENGINE_NAME!r} without the portable KV mover already "
                    "exists in this process; is another LMCache connector configured?"
                )
            self.lmcache_engine = existing
            return existing

        from vllm.distributed.parallel_state import get_tp_group

        metadata = self.get_or_create_metadata()
        extra = self.vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        mover = PortableGPUConnector(metadata, self.vllm_config.cache_config.block_size, huge_pages_enabled(extra))
        tp_group = get_tp_group()
        self.lmcache_engine = LMCacheEngineBuilder.get_or_create(
            ENGINE_NAME,
            self.lmcache_config,
            metadata,
            mover,
            tp_group.broadcast,
            tp_group.broadcast_object,
        )
        logger.info("LMCache engine built with the portable KV mover (%s)", self.fingerprint)
        return self.lmcache_engine


def create_worker_engine(vllm_config, kv_cache_config=None) -> LMCacheEngine:
    """Build (once per worker process) the engine LMCache's vLLM adapter will adopt."""
    config = prepare_config(vllm_config)
    factory = PortableServiceFactory(
        config, vllm_config, "worker", layout_fingerprint(vllm_config, kv_cache_config)
    )
    engine = factory.get_or_create_lmcache_engine()
    assert engine is not None
    return engine
