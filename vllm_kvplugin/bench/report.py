# SPDX-License-Identifier: Apache-2.0
"""Markdown tables and the TTFT plot for ``vllm-kvplugin bench``. Runs in the benchmarking process."""

from __future__ import annotations

import statistics
from pathlib import Path

from vllm_kvplugin.bench.directio import DirectIOResult
from vllm_kvplugin.bench.mover import MoverResult
from vllm_kvplugin.bench.scaling import ScalingResult
from vllm_kvplugin.bench.serving import (
    BASE_NAME, CONTROL_NAME, OURS_ASYNC_NAME, OURS_NAME, Floors, LengthResult, MissResult,
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pass(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _pages(results: list[MoverResult]) -> str:
    return "2 MiB" if all(r.huge_pages for r in results) else "4 KiB" if not any(r.huge_pages for r in results) else "mixed"


def mover_table(results: list[MoverResult]) -> str:
    rows = [
        [r.layout, str(r.block_size), r.mode, "2 MiB" if r.huge_pages else "4 KiB", f"{r.chunk_mib:.0f}",
         f"{r.copy_gbps:.1f}", f"{r.store_ratio:.0%}", f"{r.load_ratio:.0%}", f"{r.store_ratio_hot:.0%}",
         f"{r.load_ratio_hot:.0%}", _pass(min(r.store_ratio, r.load_ratio) >= 0.9),
         f"{r.layerwise_store:.2f}x / {r.layerwise_load:.2f}x"]
        for r in results
    ]
    return ("**P1 — KV mover vs `copy_`** (Llama-3.1-8B KV: 32 layers, 8 KV heads, head 128, bf16; 256-token chunks; "
            "KV pages: 4 KiB by default, 2 MiB with `kvplugin.huge_pages`)\n\n") + _table(
        ["layout", "block", "mode", "KV pages", "chunk MiB", "copy_ GB/s", "store", "load", "store (hot copy_)",
         "load (hot copy_)", "≥ 90%", "one layer per call: store / load time"], rows)


def mover_shapes_table(results: list[MoverResult]) -> str:
    """One row per model shape and layout, store / load as a fraction of ``copy_`` per block size."""
    blocks = sorted({r.block_size for r in results})
    by_row: dict[tuple[str, str], dict[int, MoverResult]] = {}
    for r in results:
        by_row.setdefault((r.shape_name, r.layout), {})[r.block_size] = r
    rows = []
    for (shape, layout), cells in by_row.items():
        worst = min(min(c.store_ratio, c.load_ratio) for c in cells.values())
        rows.append([shape, layout, *(f"{cells[b].store_ratio:.0%} / {cells[b].load_ratio:.0%}" if b in cells else "-"
                                      for b in blocks), f"{worst:.0%}", _pass(worst >= 0.9)])
    return (f"**P1 across model shapes** (per-rank KV, bf16, 256-token chunks, KV buffer on {_pages(results)} pages; "
            "store / load as a fraction of `copy_`, median over rounds)\n\n") + _table(
        ["model (KV per rank)", "layout", *(f"block {b}" for b in blocks), "worst", "≥ 90%"], rows)


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ttft_table(results: list[LengthResult], floors: Floors) -> str:
    rows = []
    for r in results:
        cold, hit, warm, example = (_med(v) for v in (r.cold_s, r.prefix_hit_s, r.ours_warm_s, r.example_warm_s))
        ours_load, example_load = _med(r.ours_load_s), _med(r.example_load_s)
        rows.append([
            str(r.tokens), f"{cold * 1000:.0f}", f"{hit * 1000:.0f}", f"{warm * 1000:.0f}",
            f"{example * 1000:.0f}" if r.example_warm_s else r.example_error or "-",
            f"{warm / hit:.2f}x ({_pass(warm / hit <= 1.2)})", f"{cold / warm:.1f}x",
            f"{ours_load * 1000:.1f} / {example_load * 1000:.1f}" if r.example_load_s else "-",
            f"{example_load / ours_load:.1f}x ({_pass(example_load / ours_load >= 5)})" if r.example_load_s else "-",
            str(r.ours_cached_tokens),
        ])
    return (
        "**P2 — TTFT (ms) on `vllm serve`, prefix caching on, KV from our connector after `/reset_prefix_cache`**\n\n"
        + _table(["tokens", "no connector, cold", "vLLM prefix hit", "ours warm", "ExampleConnector warm",
                  "ours / prefix hit (≤ 1.2x)", "cold / ours", "load ms ours / Example",
                  "load: Example / ours (≥ 5x)", "tokens from LMCache"], rows)
        + "\n\nLoad ms = time inside the worker's `start_load_kv`, timed the same way for both connectors "
        f"(`vllm_kvplugin.bench.timed`). TTFT of a fresh 64-token prompt: ours {floors.ours_s * 1000:.0f} ms, "
        f"ExampleConnector {floors.example_s * 1000:.0f} ms."
    )


def miss_table(results: list[LengthResult], miss: MissResult) -> str:
    connectors = [n for n in (OURS_NAME, OURS_ASYNC_NAME) if n in miss.ttft_s]
    # The A/A control (a second engine without a connector) shows what this machine resolves between two
    # identical engines; it is reported, not judged.
    columns = (connectors or [OURS_NAME, OURS_ASYNC_NAME]) + [CONTROL_NAME] * (CONTROL_NAME in miss.ttft_s)
    rows = []
    for r in results:
        if r.cold_s and r.ours_cold_s:
            ratio = _med(r.ours_cold_s) / _med(r.cold_s)
            rows.append([f"TTFT, one fresh {r.tokens}-token prompt (stores it)",
                         f"{_med(r.cold_s) * 1000:.0f} ms", f"{_med(r.ours_cold_s) * 1000:.0f} ms",
                         f"{ratio:.3f}x", *["-"] * (2 * len(columns) - 2), _pass(ratio <= 1.02)])
    if BASE_NAME in miss.ttft_s and connectors:
        # (label, medians, scale, unit, P3/P4 bound, key of the paired-ratio intervals)
        measures = [("mean TTFT, 8 fresh 1K prompts in flight", miss.ttft_s, 1000, "ms", {"at_most": 1.02}, "ttft"),
                    ("throughput, same batches", miss.tokens_per_s, 1, "tok/s", {"at_least": 0.98}, "throughput"),
                    ("P4: decode step, 1K prompt + 128 tokens", miss.inter_token_s, 1000, "ms", {"at_most": 1.05},
                     "decode_step")]
        for label, values, scale, unit, bound, key in measures:
            row = [label, f"{values[BASE_NAME] * scale:.2f} {unit}"]
            verdicts = []
            for name in columns:
                ci = miss.ratio_ci.get(key, {}).get(name)
                if ci is None:  # no paired rounds: the ratio of medians, judged as a point
                    ratio = values[name] / values[BASE_NAME]
                    ok = ratio <= bound["at_most"] if "at_most" in bound else ratio >= bound["at_least"]
                    row += [f"{values[name] * scale:.2f} {unit}", f"{ratio:.3f}x"]
                    verdict = _pass(ok)
                else:
                    row += [f"{values[name] * scale:.2f} {unit}", str(ci)]
                    verdict = ci.verdict(**bound)
                if name != CONTROL_NAME:
                    verdicts.append(verdict)
            rows.append(row + [" / ".join(verdicts)])
    if miss.save_hold_s:
        row = ["P4: forward thread held by a storing step (median)", "-"]
        for name in columns:
            held = miss.save_hold_s.get(name)
            row += [f"{_med(held) * 1000:.2f} ms" if held else "-", "-"]
        rows.append(row + ["-"])
    titles = {OURS_NAME: "ours (sync save)", OURS_ASYNC_NAME: "ours (async save)",
              CONTROL_NAME: "A/A control: 2nd engine, no connector"}
    headers = [h for name in columns for h in (titles[name], "ratio")]
    return "**P3/P4 — cost when nothing hits**\n\n" + _table(["measure", "no connector", *headers, "within target"], rows)


def scaling_table(results: list[ScalingResult]) -> str:
    rows = [[str(r.tokens), f"{r.kv_mib:.0f}", f"{r.store_s * 1000:.1f}", f"{r.retrieve_s * 1000:.1f}",
             f"{r.kv_mib / 1024 / r.store_s:.2f}", f"{r.kv_mib / 1024 / r.retrieve_s:.2f}", str(r.hit_tokens),
             _pass(r.bit_exact), f"{r.peak_rss_mib:.0f}", f"{r.budget_mib:.0f}"] for r in results]
    return "**Context scaling — LMCacheEngine + our mover, CPU tier** (4 layers, 2 KV heads, head 64, bf16)\n\n" + _table(
        ["tokens", "KV MiB", "store ms", "retrieve ms", "store GiB/s", "retrieve GiB/s", "hit tokens",
         "bit-exact", "peak RSS +MiB", "KV buffer + tier MiB"], rows)


def spread(values: list[float], fmt: str) -> str:
    """``median (min–max)`` of ``values``, each formatted with ``fmt``; "-" if there are none."""
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def directio_table(r: DirectIOResult) -> str:
    rows = [[e.engine, op, spread(getattr(e, f"{op}_gbps"), "{:.2f}"), spread(getattr(r, f"dd_{op}_gbps"), "{:.2f}"),
             spread(getattr(e, f"{op}_ratio"), "{:.2f}x"), _pass(statistics.median(getattr(e, f"{op}_ratio")) >= 0.9)]
            for e in r.engines for op in ("write", "read")]
    skipped = "".join(f"\n\nNot measured: `{name}` ({why})." for name, why in r.skipped.items())
    return (f"**Direct-I/O tier vs `dd` (O_DIRECT both)** — {r.chunks} files of {r.chunk_mib} MiB, each engine "
            f"beside dd in the same rounds, median (min–max) of {r.rounds}; ours including CRC32C and staging\n\n"
            + _table(["engine", "", "ours GB/s", "dd GB/s", "ours / dd", "≥ 90%"], rows) + skipped)


def ttft_axes():
    """A figure and axes for a TTFT plot (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def save_ttft_plot(fig, ax, path: Path, title: str, tokens: list[int]) -> Path:
    """Log-log TTFT (ms) vs prompt tokens with a tick per length, grid and legend; written to ``path``."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    ticks = sorted(set(tokens))
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="TTFT (ms)", title=title)
    ax.set_xticks(ticks, [f"{t / 1024:.0f}K" if t >= 1024 else str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ttft_plot(results: list[LengthResult], path: Path) -> Path:
    """TTFT vs context length for the four ways a prompt's KV can come about."""
    fig, ax = ttft_axes()
    series = [("no connector, cold (prefill)", "cold_s", "o-"), ("vLLM prefix-cache hit", "prefix_hit_s", "s--"),
              ("LMCachePortableConnector warm", "ours_warm_s", "^-"), ("ExampleConnector warm", "example_warm_s", "x:")]
    for label, attr, style in series:
        points = [(r.tokens, _med(getattr(r, attr)) * 1000) for r in results if getattr(r, attr)]
        if points:
            ax.plot(*zip(*points), style, label=label)
    return save_ttft_plot(fig, ax, path, "TTFT on vLLM-CPU (2 cores), vllm serve, streaming",
                          [r.tokens for r in results])
