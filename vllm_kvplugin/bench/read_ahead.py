# SPDX-License-Identifier: Apache-2.0
"""Reads in flight: one prompt's KV loaded from each checksummed tier with ``read_ahead`` = 1, 2, 4, 8.

Runs in the benchmarking process; each measurement's LMCacheEngine in a child
process (:func:`vllm_kvplugin.bench.tiers._measure_in_child`), the tier's
server (Redis, SeaweedFS S3) and ``dd`` as other children.

A load of a prompt's chunks (``retrieve``, the path a load takes after an
unpinned lookup; the pinned lookup of ``vllm serve`` reads through the same
pipeline) keeps ``read_ahead`` verified reads in flight. For the direct-I/O tier
the raw figure is ``dd iflag=direct`` of a file of the same size in
chunk-sized reads, in the same run; for Redis and S3 it is the ``read_ahead``
= 1 row (their servers share this machine's cores, so more requests in
flight also take CPU from the client).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vllm_kvplugin.bench import tiers
from vllm_kvplugin.bench.directio import dd_direct
from vllm_kvplugin.bench.report import _table, spread
from vllm_kvplugin.storage.settings import READ_AHEAD_KEY, REMOTE_READ_AHEAD_KEY

KEYS = {"directio": READ_AHEAD_KEY, "redis": REMOTE_READ_AHEAD_KEY, "s3": REMOTE_READ_AHEAD_KEY}


@dataclass
class ReadAheadRow:
    tier: str
    read_ahead: int
    load_gbps: list[float]  # one per round
    exact: bool


def run(workdir: Path, tokens: int = 65536, values: Iterable[int] = (1, 2, 4, 8), rounds: int = 3,
        tier_names: Iterable[str] = ("directio", "redis", "s3"), chunk_size: int = 256, block_size: int = 32,
        progress: Callable[[str], None] = print) -> tuple[list[ReadAheadRow], list[float], int]:
    """Rows per tier and ``read_ahead``; dd's GB/s over the same bytes; the chunk's bytes."""
    shape = tiers.SHAPES["small"]
    kv_bytes = tokens * shape.layers * shape.block_bytes(1)
    chunk_bytes = chunk_size * shape.layers * shape.block_bytes(1)
    capacity_gb = len(tuple(values)) * rounds * kv_bytes / 1e9 * 1.5 + 0.05
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in tier_names:
        with tiers._tier(name, workdir, chunk_size, capacity_gb) as tier:
            for n in values:
                config = {**tier.config, "extra_config": {**tier.config["extra_config"], KEYS[name]: n}}
                _, load_s, exact, _ = tiers._measure_in_child(config, shape, tokens, rounds, chunk_size, block_size)
                rows.append(ReadAheadRow(name, n, [kv_bytes / s / 1e9 for s in load_s], exact))
                progress(f"read-ahead {name} {n}: load {spread(rows[-1].load_gbps, '{:.2f}')} GB/s, exact {exact}")
    dd_file = workdir / "dd-raw.bin"
    dd_direct("write", dd_file, chunk_bytes, kv_bytes // chunk_bytes)
    dd_gbps = []
    for _ in range(rounds):
        start = time.perf_counter()
        dd_direct("read", dd_file, chunk_bytes, kv_bytes // chunk_bytes)
        dd_gbps.append(kv_bytes / (time.perf_counter() - start) / 1e9)
    dd_file.unlink()
    return rows, dd_gbps, chunk_bytes


def read_ahead_table(rows: list[ReadAheadRow], dd_gbps: list[float], chunk_bytes: int) -> str:
    base = {r.tier: statistics.median(r.load_gbps) for r in rows if r.read_ahead == 1}
    dd = statistics.median(dd_gbps)
    table = [[r.tier, str(r.read_ahead), spread(r.load_gbps, "{:.2f}"),
              f"{statistics.median(r.load_gbps) / base[r.tier]:.2f}x" if r.tier in base else "-",
              f"{statistics.median(r.load_gbps) / dd:.0%}" if r.tier == "directio" else "-",
              "yes" if r.exact else "**no**"] for r in rows]
    return (f"**Reads in flight (`read_ahead`)** (one prompt's KV loaded through a real LMCacheEngine, LMCache's CPU "
            f"tier off; {chunk_bytes >> 10} KiB chunks; median (min–max) over fresh prompts; dd `iflag=direct` of "
            f"the same bytes in chunk-sized reads: {spread(dd_gbps, '{:.2f}')} GB/s)\n\n"
            + _table(["tier", "read_ahead", "load GB/s", "vs read_ahead 1", "load / dd", "bit-exact"], table))
