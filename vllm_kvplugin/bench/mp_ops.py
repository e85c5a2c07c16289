# SPDX-License-Identifier: Apache-2.0
"""LMCache MP mode's KV transfer on a CPU worker: our device plugin vs LMCache's own, against ``copy_``.

Runs in the benchmarking process. Both implementations get the call LMCache's
engine-driven transfer context makes for one request: vLLM-CPU's paged layers
(``[NB, NH, BS, 2·HS]`` per layer, LMCache format ``NL_X_NB_NH_BS_CS``), one
chunk object ``[NL, 256, NH·2·HS]`` per 256 tokens, random block ids. Each
round interleaves the three so machine noise hits them alike; a ratio is
``copy_`` time / implementation time (1.0 = as fast as copying that many
contiguous bytes), reported as the median with the 10th–90th percentile spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_kvplugin.bench.mover import KVShape

CHUNK = 256


@dataclass
class OpsResult:
    shape: str
    block_size: int
    tokens: int
    mib: float
    copy_gbps: float
    ratios: dict[str, list[float]]  # "ours store", "lmcache store", "ours load", "lmcache load" -> per round


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_ops(shapes: dict[str, KVShape] | None = None, block_sizes=(32, 128), tokens: int = 4096,
              cache_gib: float = 1.0, rounds: int = 30, progress: Callable[[str], None] = lambda m: None):
    from lmcache.lmcache_native import EngineKVFormat, PageBufferShapeDesc, TransferDirection
    from lmcache.v1.platform.devices.cpu.device_ops import CpuDeviceOps

    from vllm_kvplugin.mp.device_plugin import PortableCpuOps

    fmt = EngineKVFormat.NL_X_NB_NH_BS_CS
    impls = {"ours": PortableCpuOps(), "lmcache": CpuDeviceOps()}
    shapes = shapes or {"8b": KVShape(), "small": KVShape(layers=4, kv_heads=2, head_size=64)}
    results = []
    for name, shape in shapes.items():
        for bs in block_sizes:
            block = shape.block_bytes(bs)
            nb = max(2 * tokens // bs, int(cache_gib * 2**30) // (shape.layers * block))
            layers = [torch.randn(nb, shape.kv_heads, bs, 2 * shape.head_size).to(shape.dtype)
                      for _ in range(shape.layers)]
            width = shape.kv_heads * 2 * shape.head_size
            objects = [torch.empty(shape.layers, CHUNK, width, dtype=shape.dtype) for _ in range(tokens // CHUNK)]
            desc = PageBufferShapeDesc()
            desc.kv_size, desc.nl, desc.nb, desc.bs, desc.nh, desc.hs = 1, shape.layers, nb, bs, shape.kv_heads, \
                2 * shape.head_size
            desc.element_size, desc.block_stride_elems, desc.dtype = shape.dtype.itemsize, 0, shape.dtype
            nbytes = sum(o.numel() * o.element_size() for o in objects)
            flat = torch.cat([layer.view(-1) for layer in layers])  # a copy_ source as big as the cache
            target = torch.empty(nbytes // shape.dtype.itemsize, dtype=shape.dtype)
            ratios = {f"{impl} {way}": [] for way in ("store", "load") for impl in impls}
            copy_s = []
            progress(f"mp ops: {name} block {bs}, {tokens} tokens ({nbytes / 2**20:.0f} MiB)")
            for r in range(rounds + 1):
                ids = torch.randperm(nb)[: tokens // bs].tolist()
                offset = int(torch.randint(flat.numel() - target.numel(), ()))
                t_copy = _seconds(lambda: target.copy_(flat[offset : offset + target.numel()]))
                for impl, ops in impls.items():
                    for way, direction in (("store", TransferDirection.D2H), ("load", TransferDirection.H2D)):
                        t = _seconds(lambda: ops.multi_layer_block_kv_transfer(
                            layers, objects, ids, "cpu", direction, desc, CHUNK, fmt, 0))
                        if r:
                            ratios[f"{impl} {way}"].append(t_copy / t)
                if r:  # round 0 warms caches and allocators
                    copy_s.append(t_copy)
            results.append(OpsResult(name, bs, tokens, nbytes / 2**20, nbytes / statistics.median(copy_s) / 1e9,
                                     ratios))
    return results


def _spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=10)
    return f"{statistics.median(values):.0%} ({q[0]:.0%}–{q[-1]:.0%})"


def ops_table(results: list[OpsResult]) -> str:
    from vllm_kvplugin.bench.report import _table

    rows = []
    for r in results:
        speedup = [statistics.median(r.ratios[f"ours {w}"]) / statistics.median(r.ratios[f"lmcache {w}"])
                   for w in ("store", "load")]
        rows.append([r.shape, str(r.block_size), str(r.tokens), f"{r.mib:.0f}", f"{r.copy_gbps:.1f}",
                     _spread(r.ratios["ours store"]), _spread(r.ratios["lmcache store"]),
                     _spread(r.ratios["ours load"]), _spread(r.ratios["lmcache load"]),
                     f"{speedup[0]:.2f}x / {speedup[1]:.2f}x"])
    return ("**LMCache MP, CPU worker: `multi_layer_block_kv_transfer`, our device plugin vs LMCache's** "
            "(vLLM-CPU layout, 256-token chunks, one request's chunks per call; fraction of `copy_` speed, "
            "median (p10–p90) over rounds; same chunk bytes, tested)\n\n"
            + _table(["KV shape", "block", "tokens", "MiB", "copy_ GB/s", "ours store", "LMCache store",
                      "ours load", "LMCache load", "ours / LMCache: store / load"], rows))
