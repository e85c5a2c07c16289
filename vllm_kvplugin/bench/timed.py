# SPDX-License-Identifier: Apache-2.0
"""Connectors that time their own KV loads, for the TTFT benchmark only.

Runs in the vLLM worker process of a benchmark engine. Both wrap
``start_load_kv`` identically and append ``{"load_s": ...}`` lines to the file
named by ``KVPLUGIN_BENCH_LOAD_LOG``, so the benchmark compares load times
measured the same way for our connector and vLLM's ``ExampleConnector``,
without the per-request costs (HTTP, tokenisation, scheduling) that dominate
a warm TTFT on CPU.
"""

from __future__ import annotations

import json
import os
import time

from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector

from vllm_kvplugin.bench.serving import LOAD_LOG_ENV
from vllm_kvplugin.connector import LMCachePortableConnector


class _TimedLoads:
    def start_load_kv(self, forward_context, **kwargs) -> None:
        start = time.perf_counter()
        super().start_load_kv(forward_context, **kwargs)
        elapsed = time.perf_counter() - start
        path = os.environ.get(LOAD_LOG_ENV)
        if path and elapsed > 1e-4:  # steps that loaded nothing cost microseconds
            with open(path, "a") as f:
                f.write(json.dumps({"load_s": elapsed}) + "\n")


class TimedPortableConnector(_TimedLoads, LMCachePortableConnector):
    """``LMCachePortableConnector`` that logs how long each KV load took."""


class TimedExampleConnector(_TimedLoads, ExampleConnector):
    """vLLM's ``ExampleConnector`` that logs how long each KV load took."""
