# SPDX-License-Identifier: Apache-2.0
"""Warm TTFT through LMCache's multiprocess mode vs its in-process mode, same connector name, one run.

Runs in the benchmarking process: one ``lmcache server`` (``vllm-kvplugin
server`` flags, host memory only) and two ``vllm serve`` engines side by side
with ``LMCachePortableConnector``, one in-process (LMCache's CPU tier), one in
MP mode (``lmcache.mp.*`` keys). Measurements alternate between the engines
round by round. "Warm" drops vLLM's own prefix cache first, so the KV can
only come back through LMCache; every round uses a prompt no engine has seen.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from vllm_kvplugin.bench.serving import BENCH_SHAPE, _Prompts, _settle, engine_env
from vllm_kvplugin.demo.model import generate_model
from vllm_kvplugin.demo.server import VllmServer

IN_PROCESS = {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"lmcache.max_local_cpu_size": 2.0}}


@dataclass
class ModeResult:
    tokens: int
    cold_s: dict[str, list[float]] = field(default_factory=dict)
    warm_s: dict[str, list[float]] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)


def _mp(server, **keys) -> dict:
    return {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": server.port,
                                          **{f"lmcache.mp.{k}": v for k, v in keys.items()}}}


def run(workdir: Path, lengths: Iterable[int] = (1024, 4096, 16384), repeats: int = 5,
        progress: Callable[[str], None] = lambda m: None) -> list[ModeResult]:
    """In-process vs three MP transfers: the worker's chunks pickled over ZMQ (``engine_driven``, LMCache's
    default without ``--shm-name``), written into the server's shared-memory L1 slots (``--shm-name``),
    and the server copying from the worker's KV in shared memory (``lmcache_driven``, CPU)."""
    from vllm_kvplugin.mp.server import ServerProcess

    workdir.mkdir(parents=True, exist_ok=True)
    model = str(generate_model(workdir / "bench-model", BENCH_SHAPE))
    lengths = list(lengths)
    max_len = max(lengths) + 256
    prompts = _Prompts(seed=3)
    results = [ModeResult(n) for n in lengths]
    with ExitStack() as stack:
        plain = stack.enter_context(ServerProcess(workdir, l1_size_gb=2.0, shm=False))
        shm = stack.enter_context(ServerProcess(workdir, l1_size_gb=2.0))  # vllm-kvplugin server's default
        configs = {"in-process": IN_PROCESS, "MP engine_driven, pickle": _mp(plain),
                   "MP engine_driven, SHM": _mp(shm), "MP lmcache_driven (SHM)": _mp(plain, mp_transfer_mode="lmcache_driven")}
        engines = {}
        for name, kv in configs.items():
            engines[name] = VllmServer(model, kv, workdir / f"serve-{name.split(',')[0].replace(' ', '-')}-{len(engines)}.log",
                                       env=engine_env(), prefix_caching=True, max_model_len=max_len,
                                       extra_args=("--max-num-batched-tokens", str(max_len)))
            stack.callback(engines[name].stop)
        for srv in engines.values():
            srv.wait_ready()
        for srv in engines.values():  # first store allocates buffers; first load warms the path
            warmup = prompts(1024)
            srv.complete(warmup, max_tokens=1)
            srv.reset_prefix_cache()
            srv.complete(warmup, max_tokens=1)
        for r in results:
            for i in range(repeats):
                order = list(engines.items())
                for name, srv in order if i % 2 else reversed(order):
                    p = prompts(r.tokens)
                    _settle()
                    r.cold_s.setdefault(name, []).append(srv.complete(p, max_tokens=1).ttft_s)
                    srv.reset_prefix_cache()
                    _settle()
                    warm = srv.complete(p, max_tokens=1)
                    r.warm_s.setdefault(name, []).append(warm.ttft_s)
                    r.cached[name] = warm.cached_tokens
            progress(f"{r.tokens} tokens: warm " + ", ".join(
                f"{name} {statistics.median(v) * 1000:.0f} ms" for name, v in r.warm_s.items()))
    return results


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ({min(values) * 1000:.0f}–{max(values) * 1000:.0f})"


def modes_table(results: list[ModeResult]) -> str:
    from vllm_kvplugin.bench.report import _table

    rows = []
    for r in results:
        for name, warm in r.warm_s.items():
            ratios = [w / i for w, i in zip(warm, r.warm_s["in-process"])]
            rows.append([str(r.tokens), name, _ms(r.cold_s[name]), _ms(warm),
                         f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f})", str(r.cached[name])])
    return ("**LMCache MP vs in-process, `LMCachePortableConnector` on `vllm serve`** (TTFT ms, median (min–max) "
            "over alternating rounds; warm = vLLM's prefix cache dropped, KV from LMCache's host memory; MP: "
            "`vllm-kvplugin server`; engine_driven workers move KV through our device plugin)\n\n"
            + _table(["prompt tokens", "connector", "cold", "warm", "warm / in-process warm (per round)",
                      "cached tokens"], rows))
