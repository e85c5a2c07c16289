# SPDX-License-Identifier: Apache-2.0
"""Connectors that time their own KV loads (and ours its stores), for the serving benchmark only.

Runs in the vLLM worker process of a benchmark engine. Both wrap
``start_load_kv`` identically and append ``{"load_s": ...}`` lines to the file
named by ``KVPLUGIN_BENCH_LOAD_LOG``, so the benchmark compares load times
measured the same way for our connector and vLLM's ``ExampleConnector``,
without the per-request costs (HTTP, tokenisation, scheduling) that dominate
a warm TTFT on CPU. Ours also logs ``{"save_s": ...}``: how long each step
that stores KV kept the forward thread in ``wait_for_save`` (P4: with async
saves, only the hand-off to the save thread), and ``{"lookup_s": ...}``: how
long each of LMCache's pinned lookups took in the worker. Our tiers that
outlive the process read and verify every chunk there, at lookup, and hold it
until the load (``vllm_kvplugin.lmcache.chunk_tier``), so for them the time
to bring KV in is lookup plus ``start_load_kv`` (``bench context``). The
lookup is timed by wrapping the bound ``lookup`` of this worker's own LMCache
engine object, which LMCache's lookup server calls; nothing shared is touched.
"""

from __future__ import annotations

import json
import os
import time

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector

from vllm_kvplugin.bench.serving import LOAD_LOG_ENV
from vllm_kvplugin.connector import LMCachePortableConnector


def _log(**record: float) -> None:
    path = os.environ.get(LOAD_LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


class _TimedLoads:
    def start_load_kv(self, forward_context, **kwargs) -> None:
        start = time.perf_counter()
        super().start_load_kv(forward_context, **kwargs)
        elapsed = time.perf_counter() - start
        if elapsed > 1e-4:  # steps that loaded nothing cost microseconds
            _log(load_s=elapsed)


class TimedPortableConnector(_TimedLoads, LMCachePortableConnector):
    """``LMCachePortableConnector`` that logs how long each KV load and lookup took, and each store held the
    forward."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.WORKER:
            lookup = self._portable_engine.lookup

            def timed_lookup(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return lookup(*args, **kwargs)
                finally:
                    _log(lookup_s=time.perf_counter() - start)

            self._portable_engine.lookup = timed_lookup  # this engine object only (see the module docstring)

    def wait_for_save(self) -> None:
        requests = getattr(self._get_connector_metadata(), "requests", ())
        stores = any(r.save_spec is not None and r.save_spec.can_save for r in requests)
        start = time.perf_counter()
        super().wait_for_save()
        if stores:
            _log(save_s=time.perf_counter() - start)


class TimedExampleConnector(_TimedLoads, ExampleConnector):
    """vLLM's ``ExampleConnector`` that logs how long each KV load took."""
