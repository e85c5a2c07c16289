# SPDX-License-Identifier: Apache-2.0
"""Context scaling: store and retrieve 2K → 128K tokens through a real LMCacheEngine with our mover.

Runs in the benchmarking process (LMCache's engine in-process, CPU tier, no vLLM).
Checks that time grows linearly with tokens and that peak host memory stays
within the paged KV buffer plus the configured tier plus a constant.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil
import torch

from vllm_kvplugin.bench.layouts import vllm_style_views


@dataclass
class ScalingResult:
    tokens: int
    kv_mib: float
    store_s: float
    retrieve_s: float
    hit_tokens: int
    bit_exact: bool
    peak_rss_mib: float  # above the process's RSS before the engine was built
    budget_mib: float  # paged KV buffer + LMCache CPU tier


class _PeakRss:
    """Samples this process's RSS every millisecond while active."""

    def __enter__(self):
        self._proc, self.peak, self._stop = psutil.Process(os.getpid()), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(
    token_counts: Iterable[int] = (2048, 32768, 131072),
    layers: int = 4, kv_heads: int = 2, head_size: int = 64, block_size: int = 32, chunk_size: int = 256,
    progress: Callable[[str], None] = print,
) -> list[ScalingResult]:
    """One fresh engine per size: store all tokens, look them up, retrieve them into other blocks."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata

    from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("lmcache")]:
        logging.getLogger(name).setLevel(logging.WARNING)  # LMCache dumps its whole config per engine
    results = []
    for tokens in token_counts:
        kv_bytes_per_token = 2 * layers * kv_heads * head_size * 2  # bf16
        kv_mib = tokens * kv_bytes_per_token / 2**20
        tier_gb = 2 * tokens * kv_bytes_per_token / 1e9 + 0.01
        blocks = 2 * tokens // block_size  # room for the source and the destination copy
        baseline = psutil.Process(os.getpid()).memory_info().rss
        with _PeakRss() as peak:
            buffer = torch.randint(-128, 128, (layers * blocks * kv_heads * block_size * 2 * head_size * 2,), dtype=torch.int8)
            views = vllm_style_views(buffer.view(torch.bfloat16), "LBHNC", layers, blocks, kv_heads, block_size, 2 * head_size)
            cfg = LMCacheEngineConfig.from_defaults(chunk_size=chunk_size, local_cpu=True, max_local_cpu_size=tier_gb)
            md = LMCacheMetadata(
                model_name="scaling", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                kv_dtype=torch.bfloat16, kv_shape=(layers, 2, chunk_size, kv_heads, head_size),
                role="worker", chunk_size=chunk_size,
            )
            engine_id = f"scaling-{uuid.uuid4()}"
            engine = LMCacheEngineBuilder.get_or_create(
                engine_id, cfg, md, PortableGPUConnector(md, block_size), lambda t, s: t, lambda o, s: o
            )
            engine.post_init()
            ids = torch.randint(0, 1000, (tokens,))
            pos = torch.arange(tokens)
            src_slots = (pos // block_size) * block_size + pos % block_size
            dst_slots = src_slots + (blocks // 2) * block_size
            start = time.perf_counter()
            engine.store(ids, kvcaches=views, slot_mapping=src_slots)
            store_s = time.perf_counter() - start
            deadline = time.monotonic() + 60
            while (hit := engine.lookup(ids)) < tokens and time.monotonic() < deadline:
                time.sleep(0.01)
            start = time.perf_counter()
            engine.retrieve(ids, kvcaches=views, slot_mapping=dst_slots)
            retrieve_s = time.perf_counter() - start
            half = buffer.view(layers, blocks, -1)
            exact = torch.equal(half[:, : blocks // 2], half[:, blocks // 2 :])
            LMCacheEngineBuilder.destroy(engine_id)
        results.append(ScalingResult(
            tokens, kv_mib, store_s, retrieve_s, hit, exact, (peak.peak - baseline) / 2**20,
            (buffer.numel() + tier_gb * 1e9) / 2**20,
        ))
        progress(f"scaling {tokens} tokens ({kv_mib:.0f} MiB KV): store {store_s * 1000:.0f} ms, "
                 f"retrieve {retrieve_s * 1000:.0f} ms, peak +{results[-1].peak_rss_mib:.0f} MiB")
        del engine, views, buffer
    return results
