# SPDX-License-Identifier: Apache-2.0
"""The connector's counters, carried by vLLM's KV-connector stats API to its log and ``/metrics``.

Each number is counted in the process that sees it, and vLLM moves it on:

* engine core (scheduler role): lookups, looked-up prompt tokens, hit tokens;
* every worker: tokens, bytes and mover seconds of loads and stores, blocks
  reported as failed loads, direct-I/O tier evictions. vLLM sums the workers'
  :class:`KVPluginStats` (``KVOutputAggregator``), adds the scheduler's and
  sends the result, as a plain dict, to the API server;
* API server: :class:`KVPluginStats` sums those dicts between two log lines
  (vLLM's "KV Transfer metrics" line) and :class:`KVPluginPromMetrics` adds
  them to Prometheus counters named ``vllm:kvplugin_<key>_total``, labelled
  like every vLLM metric (``model_name``, ``engine``).

Every value is a counter, so aggregating is summing. Rates (hit rate, GB/s)
are derived when reducing for the log; in Prometheus, divide the counters'
rates, e.g. ``rate(vllm:kvplugin_loaded_bytes_total[1m]) /
rate(vllm:kvplugin_load_seconds_total[1m])``. GB/s is per mover second: with
several workers, seconds add up like bytes, so it is a per-worker figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

PREFIX = "vllm:kvplugin_"

# key -> Prometheus documentation. Token counts come once per engine (the
# scheduler, or worker 0); bytes, seconds, failures and evictions from all workers.
COUNTERS: dict[str, str] = {
    "lookups": "Requests whose prompt the connector was asked about (scheduled waiting requests).",
    "lookup_tokens": "Prompt tokens of those requests.",
    "hit_tokens": "Prompt tokens the connector supplied from LMCache instead of prefill.",
    "loaded_tokens": "Tokens the KV mover loaded into vLLM's KV blocks.",
    "loaded_bytes": "Bytes the KV mover loaded into vLLM's KV blocks, all workers.",
    "load_seconds": "Seconds the KV mover spent loading, all workers.",
    "stored_tokens": "Tokens the KV mover copied out of vLLM's KV blocks for storing.",
    "stored_bytes": "Bytes the KV mover copied out of vLLM's KV blocks, all workers.",
    "store_seconds": "Seconds the KV mover spent copying out for stores, all workers.",
    "load_failed_blocks": "KV blocks reported to vLLM as failed loads (recomputed or failed requests).",
    "directio_evictions": "Chunk files the direct-I/O tier evicted to stay within its size budget.",
}


@dataclass
class KVPluginStats(KVConnectorStats):
    """Counter increments of one interval; ``data`` maps :data:`COUNTERS` keys to numbers.

    Built in workers and the engine core, rebuilt from ``data`` in the API
    server (:meth:`LMCachePortableConnector.build_kv_connector_stats`).
    """

    def __post_init__(self):
        _check_keys(self.data)

    def add(self, **increments: float) -> KVPluginStats:
        """Add to counters (zeros are not stored, so an idle interval stays empty)."""
        _check_keys(increments)
        for key, value in increments.items():
            if value:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        assert isinstance(other, KVPluginStats), type(other)
        return self.add(**other.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def reduce(self) -> dict[str, int | float]:
        """The interval's counters plus hit rate (%) and load/store GB/s, for vLLM's log line."""
        get = self.data.get
        out: dict[str, int | float] = {key: _rounded(get(key, 0)) for key in COUNTERS}
        looked_up = get("lookup_tokens", 0)
        out["hit_rate_pct"] = round(100 * get("hit_tokens", 0) / looked_up, 1) if looked_up else 0.0
        out["load_gbps"] = _gbps(get("loaded_bytes", 0), get("load_seconds", 0))
        out["store_gbps"] = _gbps(get("stored_bytes", 0), get("store_seconds", 0))
        return out


def _check_keys(counts: dict) -> None:
    unknown = set(counts) - set(COUNTERS)
    if unknown:
        raise ValueError(f"unknown kvplugin counters {sorted(unknown)}")


def _rounded(value: float) -> int | float:
    return value if isinstance(value, int) else round(value, 6)


def _gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0


class KVPluginPromMetrics(KVConnectorPromMetrics):
    """Prometheus counters for :data:`COUNTERS`; built in the API server by vLLM's
    ``PrometheusStatLogger`` through the connector's ``build_prom_metrics``."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for key, documentation in COUNTERS.items():
            counter = self._counter_cls(
                name=PREFIX + key, documentation=documentation, labelnames=labelnames
            )
            self._counters[key] = {
                idx: counter.labels(*values) for idx, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            if value:
                self._counters[key][engine_idx].inc(value)


class WorkerStatsSampler:
    """Turns the worker's cumulative totals (KV mover, direct-I/O tier) into interval increments.

    Runs in each worker, once per step (``get_kv_connector_stats``): the mover
    and the tier only ever add to their totals, never reset them, so counting
    costs their hot paths an addition (under a lock in the mover, whose stores
    may run on the save thread).
    """

    def __init__(self, count_tokens: bool):
        self._count_tokens = count_tokens  # one worker per engine counts tokens
        self._last: dict[str, float] = {}

    def sample(self, totals: dict[str, float]) -> dict[str, float]:
        """Increments since the previous call (token totals dropped unless this worker counts them)."""
        if not self._count_tokens:
            totals = {k: v for k, v in totals.items() if not k.endswith("_tokens")}
        increments = {k: v - self._last.get(k, 0) for k, v in totals.items()}
        self._last = totals
        return increments
