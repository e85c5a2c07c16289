# SPDX-License-Identifier: Apache-2.0
"""P2–P4 on a real ``vllm serve``: TTFT with KV from our connector, miss overhead, decode stalls.

Runs in the benchmarking process; each engine is vLLM's own server on loopback,
driven over HTTP with streaming (TTFT = first streamed token). The engines run
side by side on the same pinned cores, but only one is busy at a time, and
their measurements alternate, so both sides of a ratio see the same noise. All engines run with vLLM's prefix cache on, so
they differ only in the connector; "connector warm" first drops vLLM's own
prefix cache (``/reset_prefix_cache``) so that the KV can only come back
through the connector. Every cold measurement uses a prompt no engine has seen.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from vllm_kvplugin.bench.paired import RatioCI, paired_ratio_ci
from vllm_kvplugin.demo.model import ModelShape, generate_model, random_prompt
from vllm_kvplugin.demo.server import VllmServer

# Small enough to prefill 16K tokens in seconds on two cores, with real attention cost.
BENCH_SHAPE = ModelShape(
    hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=16384 + 512,
)
# Both connectors wrapped identically to log their load times (vllm_kvplugin.bench.timed).
OURS = {"kv_connector": "TimedPortableConnector", "kv_connector_module_path": "vllm_kvplugin.bench.timed",
        "kv_role": "kv_both", "kv_connector_extra_config": {"lmcache.max_local_cpu_size": 2.0}}
OURS_ASYNC = OURS | {"kv_connector_extra_config": OURS["kv_connector_extra_config"] | {"kvplugin.save_mode": "async"}}
EXAMPLE = {"kv_connector": "TimedExampleConnector", "kv_connector_module_path": "vllm_kvplugin.bench.timed",
           "kv_role": "kv_both"}


BASE_NAME, OURS_NAME, OURS_ASYNC_NAME = "no connector", "LMCachePortableConnector", "LMCachePortableConnector, async save"
# A/A control for P3: a second, identical engine without a connector. Two engines side by side differ by
# more than 2% on this VM (where each one's memory and threads land); its interval is that floor.
CONTROL_NAME = "no connector, second engine"

LOAD_LOG_ENV = "KVPLUGIN_BENCH_LOAD_LOG"  # read by vllm_kvplugin.bench.timed in the worker


def read_new_records(path: str, seen: int) -> tuple[list[dict], int]:
    """The records (``{"load_s": ...}``, ...) the worker appended since line ``seen``, and the new line count."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return [], seen
    return [json.loads(line) for line in lines[seen:]], len(lines)


def read_new_times(path: str, seen: int, kind: str = "load_s") -> tuple[list[float], int]:
    """Times of ``kind`` (``load_s``, ``save_s``, ``lookup_s``) the worker appended since line ``seen``, and the new
    line count."""
    records, seen = read_new_records(path, seen)
    return [r[kind] for r in records if kind in r], seen


@dataclass
class LengthResult:
    tokens: int
    cold_s: list[float] = field(default_factory=list)          # no connector, fresh prompt
    prefix_hit_s: list[float] = field(default_factory=list)    # no connector, vLLM prefix-cache hit
    ours_cold_s: list[float] = field(default_factory=list)     # our connector, fresh prompt (stores)
    ours_warm_s: list[float] = field(default_factory=list)     # our connector, KV loaded from LMCache
    example_warm_s: list[float] = field(default_factory=list)  # vLLM's ExampleConnector, KV from disk
    ours_load_s: list[float] = field(default_factory=list)     # start_load_kv time in the worker
    example_load_s: list[float] = field(default_factory=list)
    ours_cached_tokens: int = 0
    example_error: str = ""


@dataclass
class Floors:
    """TTFT of a fresh 64-token prompt per engine: what a request costs besides prefill or KV load."""

    ours_s: float = 0.0
    example_s: float = 0.0


@dataclass
class MissResult:
    """Fresh random prompts in flight together: what a connector costs when nothing hits.

    The dicts hold medians over rounds, per engine; ``ratio_ci`` the P3 verdict's
    evidence: per measure, per connector, the paired per-round ratio to no
    connector with its 95% interval (:mod:`vllm_kvplugin.bench.paired`).
    """

    ttft_s: dict[str, float] = field(default_factory=dict)
    tokens_per_s: dict[str, float] = field(default_factory=dict)
    inter_token_s: dict[str, float] = field(default_factory=dict)
    # P4, connectors only: how long a step that stores held the forward thread in wait_for_save
    save_hold_s: dict[str, list[float]] = field(default_factory=dict)
    ratio_ci: dict[str, dict[str, RatioCI]] = field(default_factory=dict)


def engine_env() -> dict[str, str]:
    """Identical thread pinning for every engine compared (REFERENCE §12), dev endpoints on."""
    return {
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"),
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_SERVER_DEV_MODE": "1",
        "LMCACHE_TRACK_USAGE": "false",
        "DO_NOT_TRACK": "1",
    }


class _Prompts:
    """Fresh random prompts; never the same text twice in one run."""

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def __call__(self, tokens: int) -> str:
        return random_prompt(tokens - 1, self._rng, BENCH_SHAPE)  # + BOS


class _Engine:
    """One running server plus the file its worker logs KV load times to."""

    def __init__(self, server: VllmServer, loads: Path):
        self.server, self._loads, self._seen = server, str(loads), 0

    def new_times(self, kind: str) -> list[float]:
        """The worker's ``kind`` times logged since the last call (see :mod:`vllm_kvplugin.bench.timed`)."""
        times, self._seen = read_new_times(self._loads, self._seen, kind)
        return times

    def new_records(self) -> list[dict]:
        """Every record the worker logged since the last call, whatever its kind."""
        records, self._seen = read_new_records(self._loads, self._seen)
        return records

    def warm(self, prompt: str) -> tuple[float, float, int]:
        """Drop vLLM's prefix cache, resend ``prompt``: (TTFT, KV load seconds, cached tokens)."""
        self.server.reset_prefix_cache()
        self.new_times("load_s")
        out = self.server.complete(prompt, max_tokens=1)
        return out.ttft_s, sum(self.new_times("load_s")), out.cached_tokens


def run(
    workdir: Path,
    lengths: Iterable[int] = (1500, 2900, 6100, 16000),
    repeats: int = 3,
    ttft: bool = True,
    miss: bool = True,
    miss_prompts: int = 8,
    progress: Callable[[str], None] = print,
) -> tuple[list[LengthResult], MissResult, Floors]:
    """Start the engines side by side, then interleave their measurements.

    All servers are up at once but only one is busy at a time; alternating them
    round by round puts every ratio's two sides under the same machine noise.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    model = str(generate_model(workdir / "bench-model", BENCH_SHAPE))
    lengths = list(lengths)
    results = [LengthResult(n) for n in lengths]
    miss_result, floors, prompts = MissResult(), Floors(), _Prompts()
    max_len = max(lengths) + 256

    def start(name: str, kv: dict | None) -> _Engine:
        loads = workdir / f"loads-{name}.jsonl"
        loads.unlink(missing_ok=True)
        # Whole prompts in one step for every engine: ExampleConnector breaks under
        # chunked prefill (it saves the first scheduled chunk only, then fails to load).
        srv = VllmServer(model, kv, workdir / f"serve-{name}.log", env=engine_env() | {LOAD_LOG_ENV: str(loads)},
                         prefix_caching=True, max_model_len=max_len,
                         extra_args=("--max-num-batched-tokens", str(max_len)))
        return _Engine(srv, loads)

    with tempfile.TemporaryDirectory(dir=workdir) as store, ExitStack() as stack:
        progress("starting vllm serve: no connector, LMCachePortableConnector" + (", ExampleConnector" if ttft else "")
                 + (", LMCachePortableConnector with async saves, a second engine without connector" if miss else ""))
        base, ours = start("no-connector", None), start("lmcache-portable", OURS)
        example = start("example-connector", EXAMPLE | {"kv_connector_extra_config": {"shared_storage_path": store}}) if ttft else None
        ours_async = start("lmcache-portable-async", OURS_ASYNC) if miss else None
        control = start("no-connector-control", None) if miss else None
        engines = [e for e in (base, ours, example, ours_async, control) if e is not None]
        for e in engines:  # stop every server on the way out, even if another never came up
            stack.callback(e.server.stop)
        for e in engines:
            e.server.wait_ready()
        floors.ours_s = _floor(ours, prompts)
        if example:
            floors.example_s = _floor(example, prompts)
        _floor(base, prompts)

        for r in results if ttft else ():
            for _ in range(repeats):
                p = prompts(r.tokens)
                _settle()
                r.cold_s.append(base.server.complete(p, max_tokens=1).ttft_s)
                r.prefix_hit_s.append(base.server.complete(p, max_tokens=1).ttft_s)
                p = prompts(r.tokens)
                _settle()
                r.ours_cold_s.append(ours.server.complete(p, max_tokens=1).ttft_s)
                ttft_s, load_s, r.ours_cached_tokens = ours.warm(p)
                r.ours_warm_s.append(ttft_s)
                r.ours_load_s.append(load_s)
                if example and not r.example_error:
                    p = prompts(r.tokens)
                    _settle()
                    try:
                        example.server.complete(p, max_tokens=1)
                        ttft_s, load_s, _ = example.warm(p)
                    except OSError as e:  # its engine died: report it, keep the other results
                        r.example_error = f"ExampleConnector failed: {e}"
                        continue
                    r.example_warm_s.append(ttft_s)
                    r.example_load_s.append(load_s)
            progress(f"{r.tokens} tokens: cold {_ms(r.cold_s)} | prefix hit {_ms(r.prefix_hit_s)} | ours first "
                     f"{_ms(r.ours_cold_s)}, warm {_ms(r.ours_warm_s)}, load {_ms(r.ours_load_s)} | Example warm "
                     f"{_ms(r.example_warm_s)}, load {_ms(r.example_load_s)} {r.example_error}")
        if miss:
            _floor(ours_async, prompts)
            connectors = {OURS_NAME: ours, OURS_ASYNC_NAME: ours_async}
            for engine in connectors.values():
                engine.new_times("save_s")  # only the miss rounds' stores count below
            _floor(control, prompts)
            _miss({BASE_NAME: base.server} | {name: e.server for name, e in connectors.items()}
                  | {CONTROL_NAME: control.server}, prompts, miss_prompts, miss_result, progress)
            for name, engine in connectors.items():
                miss_result.save_hold_s[name] = engine.new_times("save_s")
                progress(f"P4 ({name}): a storing step held the forward thread {_ms(miss_result.save_hold_s[name])} "
                         f"(median of {len(miss_result.save_hold_s[name])} steps)")
    return results, miss_result, floors


def _settle() -> None:
    """Let the previous engine's OpenMP threads stop spinning before the next one is timed.

    vLLM-CPU's OpenMP workers busy-wait after each parallel region (KMP_BLOCKTIME);
    an engine timed right after another would share the cores with that spin.
    """
    time.sleep(1.0)


def _floor(engine: _Engine, prompts) -> float:
    """Warm every path up (first store allocates LMCache's buffer); median TTFT of fresh 64-token prompts."""
    srv = engine.server
    warm = prompts(1024)
    srv.complete(warm, max_tokens=2)
    engine.warm(warm)
    return statistics.median(srv.complete(prompts(64), max_tokens=1).ttft_s for _ in range(5))


def _miss(servers: dict[str, VllmServer], prompts, count: int, out: MissResult, progress, rounds: int = 20) -> None:
    """Rounds of ``count`` fresh 1K-token prompts at once (64 new tokens each), then one long decode,
    engine after engine, the order alternating. Round 0 only warms kernels for new batch shapes.

    The first engine is the baseline: each connector's per-round ratios to it give the interval.
    """
    ttfts = {name: [] for name in servers}
    rates = {name: [] for name in servers}
    steps = {name: [] for name in servers}
    order = list(servers.items())
    for i in range(rounds + 1):
        for name, srv in order if i % 2 else reversed(order):
            batch = [prompts(1024) for _ in range(count)]
            _settle()
            start = time.perf_counter()
            with ThreadPoolExecutor(count) as pool:
                done = list(pool.map(lambda p: srv.complete(p, max_tokens=64), batch))
            wall = time.perf_counter() - start
            if i:
                ttfts[name].append(statistics.mean(c.ttft_s for c in done))
                rates[name].append(sum(c.completion_tokens for c in done) / wall)
                _settle()
                steps[name].append(srv.complete(prompts(1024), max_tokens=128).inter_token_s)
    base = order[0][0]
    for measure, values in (("ttft", ttfts), ("throughput", rates), ("decode_step", steps)):
        out.ratio_ci[measure] = {name: paired_ratio_ci(values[name], values[base]) for name in servers if name != base}
    for name in servers:
        out.ttft_s[name] = statistics.median(ttfts[name])
        out.tokens_per_s[name] = statistics.median(rates[name])
        out.inter_token_s[name] = statistics.median(steps[name])
        progress(f"miss ({name}): mean TTFT {out.ttft_s[name] * 1000:.0f} ms, "
                 f"{out.tokens_per_s[name]:.1f} tok/s, decode step {out.inter_token_s[name] * 1000:.2f} ms"
                 + "".join(f"; {m} vs {base} {cis[name]}" for m, cis in out.ratio_ci.items() if name in cis))


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.2f} ms" if values else "-"
