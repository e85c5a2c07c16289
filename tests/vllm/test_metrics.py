# SPDX-License-Identifier: Apache-2.0
"""The connector's stats through vLLM's own KV-connector stats machinery, without an engine."""

import os
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from lmcache.v1.metadata import LMCacheMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

from vllm_kvplugin.connector import LMCachePortableConnector
from vllm_kvplugin.lmcache.gpu_connector import PortableGPUConnector
from vllm_kvplugin.metrics import KVPluginStats, WorkerStatsSampler
from vllm_kvplugin.storage.directory import ChunkDirectory


def interval() -> tuple[KVPluginStats, ...]:
    """One step as vLLM sees it: two TP workers and the scheduler."""
    worker0 = KVPluginStats().add(loaded_tokens=512, loaded_bytes=4_000_000, load_seconds=0.002,
                                  stored_tokens=256, stored_bytes=2_000_000, store_seconds=0.004)
    worker1 = KVPluginStats().add(loaded_bytes=4_000_000, load_seconds=0.002, load_failed_blocks=2,
                                  stored_bytes=2_000_000, store_seconds=0.004, directio_evictions=3)
    scheduler = KVPluginStats().add(lookups=2, lookup_tokens=1800, hit_tokens=512)
    return worker0, worker1, scheduler


def test_aggregate_sums_workers_and_scheduler_and_reduce_derives_rates():
    worker0, worker1, scheduler = interval()
    total = worker0.aggregate(worker1).aggregate(scheduler)  # vLLM's order: workers, then scheduler
    reduced = total.reduce()
    assert reduced["loaded_bytes"] == 8_000_000 and reduced["load_seconds"] == pytest.approx(0.004)
    assert reduced["loaded_tokens"] == 512  # only worker 0 counts tokens
    assert reduced["load_failed_blocks"] == 2 and reduced["directio_evictions"] == 3
    assert reduced["hit_rate_pct"] == pytest.approx(28.4)  # 512 / 1800
    assert reduced["load_gbps"] == pytest.approx(2.0)  # 8 MB in 4 ms
    assert reduced["store_gbps"] == pytest.approx(0.5)


def test_empty_intervals_stay_empty_and_unknown_counters_are_refused():
    stats = KVPluginStats().add(lookups=0, loaded_bytes=0)
    assert stats.is_empty() and stats.data == {}
    assert stats.reduce()["hit_rate_pct"] == 0.0 and stats.reduce()["load_gbps"] == 0.0
    with pytest.raises(ValueError, match="hit_tokenz"):
        stats.add(hit_tokenz=1)
    with pytest.raises(ValueError):
        KVPluginStats({"bytes": 1})


def test_stats_survive_the_engine_core_to_api_server_hop():
    total = KVPluginStats()
    for stats in interval():
        total.aggregate(stats)
    wire = MsgpackEncoder().encode(SchedulerStats(kv_connector_stats=total.to_dict()))
    received = MsgpackDecoder(SchedulerStats).decode(wire).kv_connector_stats
    rebuilt = LMCachePortableConnector.build_kv_connector_stats(received)
    assert isinstance(rebuilt, KVPluginStats) and rebuilt.reduce() == total.reduce()


def test_vllm_logs_the_interval_sum_then_resets():
    logging = KVConnectorLogging(KVTransferConfig(
        kv_connector="LMCachePortableConnector", kv_connector_module_path="vllm_kvplugin.connector",
        kv_role="kv_both",
    ))
    for stats in interval() + interval():
        logging.observe(stats.to_dict())
    lines = []
    logging.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    logging.log(log_fn=lambda fmt, *args: lines.append(fmt % args))  # nothing new: no second line
    assert len(lines) == 1
    assert "hit_tokens=1024" in lines[0] and "lookups=4" in lines[0]
    assert "loaded_bytes=16000000" in lines[0] and "load_gbps=2.0" in lines[0]


def test_prometheus_counters_accumulate_per_engine_with_vllm_labels():
    registry = CollectorRegistry()
    types = {cls: partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    config = SimpleNamespace(kv_transfer_config=None)
    prom = LMCachePortableConnector.build_prom_metrics(
        config, types, ["model_name", "engine"], {0: ["m", "0"], 1: ["m", "1"]}
    )
    for stats in interval():
        prom.observe(stats.to_dict(), engine_idx=1)
    prom.observe(interval()[2].to_dict(), engine_idx=1)

    def value(name, engine):
        return registry.get_sample_value(f"vllm:kvplugin_{name}_total", {"model_name": "m", "engine": engine})

    assert value("hit_tokens", "1") == 1024 and value("lookups", "1") == 4
    assert value("loaded_bytes", "1") == 8_000_000 and value("load_failed_blocks", "1") == 2
    assert value("hit_tokens", "0") == 0


def test_sampler_reports_increments_and_drops_tokens_on_other_ranks():
    rank0, rank1 = WorkerStatsSampler(count_tokens=True), WorkerStatsSampler(count_tokens=False)
    first = {"loaded_tokens": 64, "loaded_bytes": 1000, "load_seconds": 0.5}
    second = {"loaded_tokens": 192, "loaded_bytes": 3000, "load_seconds": 0.75}
    assert rank0.sample(first) == first
    assert rank0.sample(second) == {"loaded_tokens": 128, "loaded_bytes": 2000, "load_seconds": 0.25}
    assert rank0.sample(second) == {"loaded_tokens": 0, "loaded_bytes": 0, "load_seconds": 0}
    assert rank1.sample(first) == {"loaded_bytes": 1000, "load_seconds": 0.5}


def test_mover_counts_tokens_bytes_and_time_per_direction():
    layers, blocks, heads, block, head = 2, 8, 2, 16, 32
    metadata = LMCacheMetadata(
        model_name="m", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.bfloat16, kv_shape=(layers, 2, 32, heads, head), role="worker", chunk_size=32,
    )
    kv = list(torch.zeros(layers, blocks, heads, block, 2 * head, dtype=torch.bfloat16).unbind(0))
    mover = PortableGPUConnector(metadata, block)
    chunk = SimpleNamespace(tensor=torch.empty(tuple(mover.get_shape(32)), dtype=torch.bfloat16))
    slots = torch.arange(64) + 2 * block  # blocks 2..5
    mover.batched_from_gpu([chunk, chunk], [0, 32], [32, 64], kvcaches=kv, slot_mapping=slots)
    mover.batched_to_gpu([chunk], [32], [64], kvcaches=kv, slot_mapping=slots)
    totals = mover.totals
    chunk_bytes = chunk.tensor.numel() * 2
    assert (totals.stored_tokens, totals.stored_bytes) == (64, 2 * chunk_bytes)
    assert (totals.loaded_tokens, totals.loaded_bytes) == (32, chunk_bytes)
    assert totals.store_seconds > 0 and totals.load_seconds > 0


def test_directory_counts_evictions(tmp_path):
    size = ChunkDirectory(str(tmp_path / "probe"), 0).file_size(4096)
    directory = ChunkDirectory(str(tmp_path / "tier"), capacity_bytes=3 * size)
    for i in range(5):  # room for three files: the two oldest go
        directory.reserve(size)
        directory.commit(f"k{i}", size)
    assert directory.evictions == 2


def test_servers_do_not_inherit_lmcaches_prometheus_directory(monkeypatch, tmp_path):
    """LMCache sets PROMETHEUS_MULTIPROC_DIR=/tmp/lmcache_prometheus in any process that builds an engine;
    a vLLM server inheriting it served counters summed over every process that ever wrote there."""
    from lmcache.observability import PrometheusLogger

    from vllm_kvplugin.demo.server import server_environ

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    PrometheusLogger._ensure_multiprocess_dir()  # what building an LMCache engine does to this process
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/lmcache_prometheus"
    assert "PROMETHEUS_MULTIPROC_DIR" not in server_environ()
