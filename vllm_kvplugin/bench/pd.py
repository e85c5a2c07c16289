# SPDX-License-Identifier: Apache-2.0
"""Disaggregated prefill/decode vs colocated serving, one run: TTFT, inter-token latency, throughput.

Runs in the benchmarking (or demo) process; every server is a child process on
loopback and the setups run one after another on the same machine:

- ``colocated``: one ``vllm serve`` without a connector;
- ``PD, LMCachePortableConnector``: a ``kv_producer`` and a ``kv_consumer`` on
  one direct-I/O directory (LMCache's CPU tier off on the producer, so the
  hand-off goes through the files) behind ``vllm-router``;
- ``PD, NixlConnector``: vLLM's own peer-to-peer connector on two ``kv_both``
  servers (``kv_buffer_device: cpu``, NIXL's UCX backend) behind
  ``vllm-router --kv-connector nixl``, where the ``nixl`` package is installed,
  its OpenMP threads kept off the cores vLLM's NIXL worker takes for itself
  (:func:`nixl_omp_bind`).

Every server keeps vLLM's defaults (prefix caching on). Each round sends fresh
prompts with shared prefixes, ``in_flight`` at a time, streamed through the
setup's front door; greedy outputs are compared with the colocated server's.
"""

from __future__ import annotations

import importlib.util
import os
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from vllm_kvplugin.bench.serving import BENCH_SHAPE, engine_env
from vllm_kvplugin.demo.model import generate_model, random_prompt
from vllm_kvplugin.demo.router import PDRouter
from vllm_kvplugin.demo.server import Completion, VllmServer, free_port, stream_completion

MAX_MODEL_LEN = 4096


def ours(role: str, directory: Path) -> dict:
    return {"kv_connector": "LMCachePortableConnector", "kv_role": role,
            "kv_connector_extra_config": {"lmcache.local_cpu": role == "kv_consumer",
                                          "lmcache.max_local_cpu_size": 1.0,
                                          "kvplugin.directio.path": str(directory),
                                          "kvplugin.directio.max_size_gb": 4}}


NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}


def nixl_omp_bind() -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a NixlConnector server on vLLM-CPU: every core but those NIXL reserves.

    On CPU, vLLM's NIXL worker moves its main thread -- OpenMP's thread 0 -- to the last core of each NUMA
    node ("reserve different cores for start_load_kv()", ``nixl/base_worker.py``). With OpenMP also bound to
    that core (the other engines' binding, every core), two OpenMP threads share it and every parallel
    region waits for a time slice: one 5 MB transfer took 271 s here, decode ran at 0.2 tokens/s. Kept off
    it, OpenMP runs on the remaining cores (on two cores: one) and the transfers take milliseconds.
    """
    from vllm.platforms.cpu import CpuPlatform

    allowed = set(os.sched_getaffinity(0))
    reserved = {max(cores) for cores in CpuPlatform.discover_numa_topology() if cores}
    return ",".join(map(str, sorted(allowed - reserved) or sorted(allowed)))


@dataclass
class Round:
    ttft_s: list[float]
    itl_s: list[float]
    wall_s: float
    completion_tokens: int
    texts: list[str | None]  # None: the request failed or timed out


@dataclass
class SetupResult:
    name: str
    rounds: list[Round] = field(default_factory=list)
    decode_loaded_tokens: int | None = None  # ours: the decode server's vllm:kvplugin_hit_tokens
    prompt_tokens: int = 0


def workload(rng: random.Random, requests: int, prefix_tokens=(1000, 2000, 3000)) -> list[str]:
    """Fresh prompts: three shared prefixes, suffixes of 50–500 tokens, lengths off LMCache's chunk grid."""
    prefixes = [random_prompt(n - 1, rng, BENCH_SHAPE) for n in prefix_tokens]
    return [prefixes[i % len(prefixes)] + " " + random_prompt(rng.randrange(50, 500), rng, BENCH_SHAPE)
            for i in range(requests)]


def _round(url: str, model: str, prompts: list[str], in_flight: int, max_tokens: int, timeout_s: float) -> Round:
    """One round; a request that fails or outlives ``timeout_s`` counts as failed (text None), never hangs the run."""
    def one(prompt: str) -> Completion | None:
        try:
            return stream_completion(url, model, prompt, max_tokens, timeout=timeout_s)
        except OSError:  # URLError, HTTPError, socket timeouts
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        done = list(pool.map(one, prompts))
    ok: list[Completion] = [c for c in done if c is not None]
    return Round([c.ttft_s for c in ok], [c.inter_token_s for c in ok], time.perf_counter() - start,
                 sum(c.completion_tokens for c in ok), [None if c is None else c.text for c in done])


def _hit_tokens(server: VllmServer) -> int:
    import re
    import urllib.request

    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as r:
        found = re.search(r'^vllm:kvplugin_hit_tokens_total\{[^}]*\} (\S+)$', r.read().decode(), re.M)
    return int(float(found.group(1))) if found else 0


def nixl_available() -> bool:
    return importlib.util.find_spec("nixl") is not None


def run(workdir: Path, requests: int = 24, in_flight: int = 8, max_tokens: int = 32, repeats: int = 3,
        setups: tuple[str, ...] = ("colocated", "ours", "nixl"), request_timeout_s: float = 120.0,
        progress: Callable[[str], None] = lambda m: None) -> list[SetupResult]:
    """Each setup in turn: start it, warm it up, ``repeats`` rounds of ``requests`` fresh prompts, stop it.

    The table so far goes to ``progress`` after each setup, so a setup that stalls loses only its own row.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    model = str(generate_model(workdir / "bench-model", BENCH_SHAPE))
    rounds_prompts = [workload(random.Random(100 + i), requests) for i in range(repeats)]
    warmup = workload(random.Random(99), 2)
    results = []
    for setup in setups:
        if setup == "nixl" and not nixl_available():
            progress("PD with NixlConnector skipped: the nixl package is not installed (pip install nixl==1.5.1)")
            continue
        result = SetupResult({"colocated": "colocated, no connector", "ours": "PD, LMCachePortableConnector",
                              "nixl": "PD, NixlConnector (UCX)"}[setup])
        with ExitStack() as stack:
            url, consumer = _start(setup, model, workdir, stack)
            for p in warmup:
                stream_completion(url, model, p, 2)
            hits_before = _hit_tokens(consumer) if setup == "ours" else 0
            for prompts in rounds_prompts:
                time.sleep(1.0)  # the previous round's OpenMP threads stop spinning
                result.rounds.append(_round(url, model, prompts, in_flight, max_tokens, request_timeout_s))
            if setup == "ours":
                time.sleep(2.0)  # stats travel with engine steps
                result.decode_loaded_tokens = _hit_tokens(consumer) - hits_before
        results.append(result)
        progress("\n" + pd_table(results))
    return results


def _start(setup: str, model: str, workdir: Path, stack: ExitStack) -> tuple[str, VllmServer | None]:
    """Start a setup's servers (and router); its front-door URL and, for ours, the decode server."""
    opts = {"prefix_caching": True, "max_model_len": MAX_MODEL_LEN}
    if setup == "colocated":
        server = VllmServer(model, None, workdir / "colocated.log", env=engine_env(), **opts)
        stack.callback(server.stop)
        server.wait_ready()
        return server.base_url, None
    if setup == "ours":
        directory = workdir / "pd-kv"
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        servers = [VllmServer(model, ours(role, directory), workdir / f"pd-ours-{role}.log", env=engine_env(), **opts)
                   for role in ("kv_producer", "kv_consumer")]
        connector_name = None
    else:
        servers = [VllmServer(model, NIXL, workdir / f"pd-nixl-{i}.log", **opts,
                              env=engine_env() | {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                                                  "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
                                                  "VLLM_CPU_OMP_THREADS_BIND": nixl_omp_bind()})
                   for i in range(2)]
        connector_name = "nixl"
    for server in servers:
        stack.callback(server.stop)
    for server in servers:
        server.wait_ready()
    router = PDRouter(servers[0].base_url, servers[1].base_url, model, workdir / f"router-{setup}.log",
                      kv_connector=connector_name)
    stack.callback(router.stop)
    router.wait_ready()
    return router.base_url, servers[1]


def _spread(values: list[float], scale: float = 1000.0, fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values) * scale)} ({fmt.format(min(values) * scale)}–" \
           f"{fmt.format(max(values) * scale)})"


def pd_table(results: list[SetupResult]) -> str:
    """Markdown: per setup, TTFT and inter-token latency (median over rounds of each round's median, and the
    rounds' range), throughput and its ratio to colocated, and whether outputs equal colocated's."""
    from vllm_kvplugin.bench.report import _table

    base = next((r for r in results if r.name.startswith("colocated")), None)
    rows = []
    for r in results:
        ttft = [statistics.median(x.ttft_s or [float("nan")]) for x in r.rounds]
        itl = [statistics.median(x.itl_s or [float("nan")]) for x in r.rounds]
        tput = [x.completion_tokens / x.wall_s for x in r.rounds]
        vs = ""
        if base is not None:
            ratios = [t / b for t, b in zip(tput, (x.completion_tokens / x.wall_s for x in base.rounds))]
            vs = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f})"
        equal = "—" if base is None else \
            f"{sum(a is not None and a == b for x, y in zip(r.rounds, base.rounds) for a, b in zip(x.texts, y.texts))}/" \
            f"{sum(len(x.texts) for x in r.rounds)}"
        failed = sum(t is None for x in r.rounds for t in x.texts)
        rows.append([r.name, _spread(ttft), _spread(itl, fmt="{:.1f}"), _spread(tput, 1.0, "{:.1f}"), vs, equal,
                     str(failed), "—" if r.decode_loaded_tokens is None else str(r.decode_loaded_tokens)])
    return ("**Disaggregated prefill/decode vs colocated, through `vllm-router`** (one run, same machine; "
            "median over rounds (min–max); TTFT/ITL in ms, throughput in output tokens/s)\n\n"
            + _table(["setup", "TTFT", "inter-token latency", "throughput", "throughput / colocated",
                      "outputs equal colocated", "failed or timed out", "decode tokens loaded (ours)"], rows))
