# SPDX-License-Identifier: Apache-2.0
"""Storage tiers: one prompt's KV stored and loaded through a real LMCacheEngine with our mover, tier by tier.

Runs in the benchmarking process (LMCache's engine in-process, no vLLM). Tiers:
LMCache's CPU tier; our direct-I/O tier on a directory (O_DIRECT POSIX, and
NIXL's POSIX backend where nixl is installed); our checksummed remote
tier on a real ``redis-server`` and on a real S3 server (SeaweedFS), started here
on loopback; and, as the peer, LMCache's own Redis connector on another Redis
(no checksum: the connector refuses it, the benchmark measures it). For all but the first LMCache's CPU tier is off (``local_cpu: false``), so loads come from the files or from Redis.
Their puts are asynchronous: store time runs from ``store()`` until the tier
answers lookups for every chunk, and loads are timed only after that. The
direct-I/O tier reads with O_DIRECT where the filesystem allows it (page cache
bypassed); where it falls back to buffered I/O, loads may come from the page
cache, which this benchmark cannot drop; the row's note says which.

Each tier's engine runs in a child process that exits without closing it:
LMCache 0.5.6's ``RedisConnector.close`` awaits a blocking shutdown on its own
event loop and never returns, and LMCache's engines' threads outlive a close
anyway (one child for every tier would hold every tier's host memory at once).
The tier itself (directory, server) belongs to this process.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_kvplugin.bench.layouts import vllm_style_views
from vllm_kvplugin.bench.mover import KVShape
from vllm_kvplugin.bench.redis_server import RedisServer
from vllm_kvplugin.bench.s3_server import SeaweedS3
from vllm_kvplugin.bench.report import _pass, _table

TIERS = ("cpu", "directio", "directio-nixl", "redis", "s3", "lmcache-redis")
SHAPES = {
    "small": KVShape(layers=4, kv_heads=2, head_size=64),  # scaling.py's shape: 2 KiB/token
    "8b": KVShape(),  # Llama-3.1-8B per rank: 32 layers, 8 KV heads, head 128, bf16: 128 KiB/token
}


@dataclass
class TierResult:
    tier: str
    shape: str
    tokens: int
    kv_mib: float  # one round's KV
    store_gbps: float  # KV bytes / (store() until every chunk is readable from the tier), median of rounds
    load_gbps: float  # KV bytes / retrieve() wall time, median of rounds
    bit_exact: bool  # every round loaded every token, byte for byte
    bytes_per_token: float  # what the tier holds per stored token (objects, files, Redis keys and values)
    note: str


@dataclass
class _Tier:
    config: dict  # LMCacheEngineConfig.from_defaults keyword arguments (the config object does not pickle)
    held_bytes: Callable[[int], int]  # bytes in LMCache's CPU tier (measured by the engine) -> bytes the tier holds
    note: str


def _dataset_bytes(redis: RedisServer) -> int:  # keys and values, not client buffers
    return int(redis.memory_info()["used_memory_dataset"])


def _bucket_bytes(s3: SeaweedS3) -> int:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket)
    return sum(o["Size"] for page in pages for o in page.get("Contents", []))


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment (a spawned child inherits them), restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _tier(name: str, workdir: Path, chunk_size: int, capacity_gb: float) -> Iterator[_Tier]:
    """LMCache's config for one tier, with whatever it needs running (a directory, a Redis server)."""
    from vllm_kvplugin.lmcache.directio_backend import plugin_config
    from vllm_kvplugin.storage.directory import SUFFIX
    from vllm_kvplugin.storage.select import select_io
    from vllm_kvplugin.storage.settings import ENGINE_KEY

    # sha256_cbor: the chunk hash our connector makes LMCache use (vllm_kvplugin.plugin)
    base = {"chunk_size": chunk_size, "max_local_cpu_size": capacity_gb, "pre_caching_hash_algorithm": "sha256_cbor"}
    if name == "cpu":
        yield _Tier(dict(local_cpu=True, **base), lambda cpu_bytes: cpu_bytes, "LMCache LocalCPUBackend")
    elif name in ("directio", "directio-nixl"):
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        engine = "nixl" if name == "directio-nixl" else "posix"
        io, choice = select_io(str(directory), chunks_on_device=False, engine=engine)
        io.close()
        tier = plugin_config(str(directory), capacity_gb)
        tier["extra_config"][ENGINE_KEY] = engine
        cfg = dict(local_cpu=False, **base, **tier)
        note = f"{choice.engine}, " + ("page cache bypassed" if io.direct else "buffered: loads may hit the page cache")
        try:
            yield _Tier(cfg, lambda _: sum(p.stat().st_size for p in directory.rglob("*" + SUFFIX)), note)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    elif name == "redis":
        from vllm_kvplugin.lmcache.remote_tier import plugin_config as remote_config

        with RedisServer(workdir) as redis:
            empty = _dataset_bytes(redis)
            cfg = dict(local_cpu=False, **base, **remote_config({"kvplugin.remote.url": redis.url}))
            yield _Tier(cfg, lambda _: _dataset_bytes(redis) - empty,
                        "redis-server on loopback, checksummed chunk values")
    elif name == "s3":
        from vllm_kvplugin.lmcache.remote_tier import plugin_config as remote_config

        with SeaweedS3(workdir / "s3") as s3, _environ(s3.env):
            cfg = dict(local_cpu=False, **base, **remote_config(
                {"kvplugin.remote.url": s3.url, "kvplugin.remote.endpoint_url": s3.endpoint_url}))
            yield _Tier(cfg, lambda _: _bucket_bytes(s3), "SeaweedFS S3 (weed mini) on loopback, checksummed "
                        "chunk objects")
    elif name == "lmcache-redis":  # the peer: LMCache's own RedisConnector, which the connector refuses
        with RedisServer(workdir) as redis:
            empty = _dataset_bytes(redis)
            cfg = dict(local_cpu=False, remote_url=redis.url, remote_serde="naive", **base)
            yield _Tier(cfg, lambda _: _dataset_bytes(redis) - empty,
                        "peer: LMCache's RedisConnector, naive serde, no checksum (refused by the connector)")
    else:
        raise ValueError(f"unknown tier {name!r}; choose from {TIERS}")


def _engine(config: dict, shape: KVShape, chunk_size: int, block_size: int):
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata

    from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector

    md = LMCacheMetadata(
        model_name="tiers@kvplugin1/bench", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=shape.dtype, kv_shape=(shape.layers, 2, chunk_size, shape.kv_heads, shape.head_size),
        role="worker", chunk_size=chunk_size,
    )
    engine_id = f"tiers-{uuid.uuid4()}"
    engine = LMCacheEngineBuilder.get_or_create(
        engine_id, LMCacheEngineConfig.from_defaults(**config), md, PortableGPUConnector(md, block_size),
        lambda t, s: t, lambda o, s: o,
    )
    engine.post_init()
    return engine_id, engine


def _wait_readable(engine, ids: torch.Tensor, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.lookup(ids) < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"stored chunks not readable from the tier after {timeout_s}s")
        time.sleep(0.001)


def _measure(config: dict, shape: KVShape, tokens: int, rounds: int, chunk_size: int,
             block_size: int) -> tuple[list[float], list[float], bool, int]:
    """Child process: ``rounds`` store/load round trips of fresh prompts; store and load seconds,
    exactness, bytes in LMCache's CPU tier. The engine is never closed (the process exits)."""
    elem = torch.empty(0, dtype=shape.dtype).element_size()
    blocks = 2 * tokens // block_size  # the source blocks, then the blocks loads go to
    buffer = torch.randint(-128, 128, (shape.layers * blocks * shape.kv_heads * block_size * 2 * shape.head_size
                                       * elem,), dtype=torch.int8)
    views = vllm_style_views(buffer.view(shape.dtype), "LBHNC", shape.layers, blocks, shape.kv_heads, block_size,
                             2 * shape.head_size)
    halves = buffer.view(shape.layers, 2, -1)
    src_slots = torch.arange(tokens)
    dst_slots = src_slots + tokens
    _, engine = _engine(config, shape, chunk_size, block_size)
    store_s, load_s, exact = [], [], True
    for _ in range(rounds):
        ids = torch.randint(0, 50_000, (tokens,))  # a fresh prompt: new keys every round
        halves[:, 0].add_(1)  # and new bytes
        start = time.perf_counter()
        engine.store(ids, kvcaches=views, slot_mapping=src_slots)
        _wait_readable(engine, ids)
        store_s.append(time.perf_counter() - start)
        halves[:, 1].zero_()
        start = time.perf_counter()
        hit = engine.retrieve(ids, kvcaches=views, slot_mapping=dst_slots)
        load_s.append(time.perf_counter() - start)
        exact &= int(hit.sum()) == tokens and torch.equal(halves[:, 0], halves[:, 1])
    cpu_bytes = sum(o.get_size() for o in engine.storage_manager.local_cpu_backend.hot_cache.values())
    return store_s, load_s, exact, cpu_bytes


def _child(conn, *args) -> None:
    """Child process entry: measure, send the result (or the error), exit without closing LMCache."""
    try:
        _quiet_lmcache()
        conn.send(("ok", _measure(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()
        os._exit(0)


def _measure_in_child(config: dict, *args, timeout_s: float = 900) -> tuple[list[float], list[float], bool, int]:
    ctx = multiprocessing.get_context("spawn")  # fork would copy this process's OpenMP and LMCache threads' state
    ours, theirs = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(theirs, config, *args), daemon=True)
    child.start()
    theirs.close()
    try:
        if not ours.poll(timeout_s):
            raise TimeoutError(f"tier measurement did not finish in {timeout_s}s")
        status, value = ours.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    if status != "ok":
        raise RuntimeError(f"tier measurement failed: {value}")
    return value


def _quiet_lmcache() -> None:
    """LMCache logs its whole config and every backend's start and close per engine: warnings only."""
    import importlib

    for module in ("lmcache.v1.cache_engine", "lmcache.v1.token_database", "lmcache.usage_telemetry.continuous",
                   "lmcache.v1.storage_backend", "lmcache.v1.storage_backend.connector.redis_connector",
                   "vllm_kvplugin.lmcache.directio_backend"):
        importlib.import_module(module)  # creates the loggers silenced below
    for name in [n for n in logging.root.manager.loggerDict if n.startswith(("lmcache", "vllm_kvplugin"))]:
        logging.getLogger(name).setLevel(logging.WARNING)


def run(workdir: Path, tokens: int = 32768, shape: str = "small", tiers: Iterable[str] = TIERS, rounds: int = 3,
        block_size: int = 32, chunk_size: int = 256, progress: Callable[[str], None] = print) -> list[TierResult]:
    """Each tier in turn, on its own engine: ``rounds`` fresh ``tokens``-token prompts stored, then loaded.

    ``workdir`` holds the direct-I/O tier's files and Redis's log while they run.
    """
    if tokens % chunk_size or chunk_size % block_size:
        raise ValueError("tokens must be whole chunks, chunk_size whole blocks")
    kv_shape = SHAPES[shape]
    kv_bytes = tokens * kv_shape.layers * kv_shape.block_bytes(1)
    capacity_gb = rounds * kv_bytes / 1e9 * 1.5 + 0.05
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in tiers:
        with _tier(name, workdir, chunk_size, capacity_gb) as tier:
            store_s, load_s, exact, cpu_bytes = _measure_in_child(
                tier.config, kv_shape, tokens, rounds, chunk_size, block_size)
            held = tier.held_bytes(cpu_bytes)
        r = TierResult(name, shape, tokens, kv_bytes / 2**20, kv_bytes / statistics.median(store_s) / 1e9,
                       kv_bytes / statistics.median(load_s) / 1e9, exact, held / (rounds * tokens), tier.note)
        results.append(r)
        progress(f"tiers {shape} {tokens} tokens, {name}: store {r.store_gbps:.2f} GB/s, load {r.load_gbps:.2f} "
                 f"GB/s, bit-exact {r.bit_exact}, {r.bytes_per_token:.0f} B/token")
    return results


def tiers_table(results: list[TierResult]) -> str:
    rows = [[r.tier, r.shape, str(r.tokens), f"{r.kv_mib:.0f}", f"{r.store_gbps:.2f}", f"{r.load_gbps:.2f}",
             _pass(r.bit_exact), f"{r.bytes_per_token:.0f}", r.note] for r in results]
    return ("**Storage tiers — LMCacheEngine + our mover, one tier at a time** (small: 4 layers, 2 KV heads, "
            "head 64, bf16; 8b: Llama-3.1-8B per rank; 256-token chunks; median over fresh prompts)\n\n"
            + _table(["tier", "KV shape", "tokens", "KV MiB", "store GB/s (until readable)", "load GB/s",
                      "bit-exact", "bytes/token held", "note"], rows))
