# SPDX-License-Identifier: Apache-2.0
"""``vllm-kvplugin`` command line. Runs in the user's shell process."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

BENCHES = ("mover", "ttft", "miss", "scaling", "directio", "tiers", "read-ahead", "mp-ops", "mp-ttft", "pd", "context")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-kvplugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="serve a locally generated model with the connector; show KV reuse")
    demo.add_argument("--workdir", type=Path, default=Path("artifacts/demo"))
    demo.add_argument("--prompt-tokens", type=int, default=3000)
    demo.add_argument("--mp", action="store_true",
                      help="LMCache's multiprocess mode: an lmcache server with our L2 adapter, restarts of both")
    demo.add_argument("--pd", action="store_true",
                      help="disaggregated prefill/decode: vllm-router in front of a producer and a consumer")
    bench = sub.add_parser("bench", help="benchmarks: ratios against baselines measured in the same run")
    bench.add_argument("which", nargs="*", choices=(*BENCHES, "all"), default=["all"])
    bench.add_argument("--out", type=Path, default=Path("artifacts/bench"))
    # Off LMCache's 256-token chunk grid, as users' prompts are (a multiple of the chunk never pays the tail).
    bench.add_argument("--lengths", type=int, nargs="+", default=[1500, 2900, 6100, 16000],
                       help="prompt tokens of the serving benchmarks (ttft, mp-ttft)")
    bench.add_argument("--context-lengths", type=int, nargs="+", default=[32768, 65536, 131072],
                       help="prompt tokens of the long-context benchmark (context); its longest cold prefill "
                       "takes minutes on two cores and is measured once")
    bench.add_argument("--repeats", type=int, default=3)
    doctor = sub.add_parser("doctor", help="check this host and a KV config for KV reuse (starts no engine)")
    doctor.add_argument("--kv-transfer-config", metavar="JSON", help="the JSON given to vllm serve")
    doctor.add_argument("--block-size", type=int, help="vLLM's --block-size (default: the platform's)")
    doctor.add_argument("--json", action="store_true", help="machine-readable findings")
    server = sub.add_parser("server", help="start an `lmcache server` (LMCache MP mode) that fits the connector")
    from vllm_kvplugin.mp.server import add_arguments

    add_arguments(server)
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.pd:
            return run_pd_demo(args.workdir)
        if args.mp:
            from vllm_kvplugin.demo import mp_job

            return mp_job.run(args.workdir, args.prompt_tokens)
        from vllm_kvplugin.demo import main_job

        return main_job.run(args.workdir, args.prompt_tokens)
    if args.command == "server":
        from vllm_kvplugin.mp import server as mp_server

        return mp_server.run(args)
    if args.command == "doctor":
        from vllm_kvplugin import doctor

        return doctor.run(args.kv_transfer_config, args.block_size, args.json)
    return run_bench(set(BENCHES) if "all" in args.which else set(args.which), args)


def run_pd_demo(workdir: Path) -> int:
    """``demo --pd``: a small PD run beside a colocated server; non-zero unless every output matches and the
    decode server loaded what the prefill server handed off."""
    from vllm_kvplugin.bench import pd

    print("[demo --pd] colocated vllm serve, then vllm-router + kv_producer + kv_consumer (a few minutes)")
    results = pd.run(workdir / "pd", requests=8, in_flight=4, max_tokens=16, repeats=1,
                     setups=("colocated", "ours"), progress=lambda m: print(f"[demo --pd] {m}", flush=True))
    print("\n" + pd.pd_table(results))
    base, split = results
    same = all(a == b for a, b in zip(base.rounds[0].texts, split.rounds[0].texts))
    ok = same and bool(split.decode_loaded_tokens)
    print("\nvllm-router reports the prefill server's cached_tokens (0 for a kv_producer); the decode server's "
          "hit is `kv_transfer_params.kvplugin.loaded_tokens` in each reply and its vllm:kvplugin_hit_tokens.")
    if not ok:
        print(f"FAILED: outputs equal: {same}, decode tokens loaded: {split.decode_loaded_tokens}; logs in {workdir / 'pd'}")
    return 0 if ok else 1


def run_bench(which: set[str], args) -> int:
    """Run the chosen benchmarks, print Markdown, write ``bench.md`` (and ``ttft.png``, ``context.png``) under
    ``--out``."""
    from vllm_kvplugin.bench import report

    args.out.mkdir(parents=True, exist_ok=True)

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    sections = [f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
                f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}."]
    if "mover" in which:
        from vllm_kvplugin.bench import mover

        sections.append(report.mover_table([r for huge in (False, True)  # the default, then kvplugin.huge_pages
                                            for r in mover.bench_mover(huge_pages=huge, progress=progress)]))
        sections.append(report.mover_shapes_table(mover.bench_mover_shapes(progress=progress)))
    if which & {"ttft", "miss"}:
        from vllm_kvplugin.bench import serving

        lengths, miss, floors = serving.run(
            args.out / "serving", args.lengths, args.repeats, ttft="ttft" in which, miss="miss" in which,
            progress=progress,
        )
        if "ttft" in which:
            sections.append(report.ttft_table(lengths, floors))
            plot = report.ttft_plot(lengths, args.out / "ttft.png")
            sections.append(f"![TTFT vs context length]({plot.name})")
        sections.append(report.miss_table(lengths, miss))
    if "scaling" in which:
        from vllm_kvplugin.bench import scaling

        sections.append(report.scaling_table(scaling.run(progress=progress)))
    if "directio" in which:
        from vllm_kvplugin.bench import directio

        sections.append(report.directio_table(directio.run(args.out / "directio", progress=progress)))
    if "tiers" in which:
        from vllm_kvplugin.bench import tiers

        rows = tiers.run(args.out / "tiers", progress=progress)  # small KV, 32K tokens
        rows += tiers.run(args.out / "tiers", tokens=4096, shape="8b", progress=progress)  # 32 MiB chunks
        sections.append(tiers.tiers_table(rows))
    if "read-ahead" in which:
        from vllm_kvplugin.bench import read_ahead

        sections.append(read_ahead.read_ahead_table(*read_ahead.run(args.out / "read-ahead", progress=progress)))
    if "mp-ops" in which:
        from vllm_kvplugin.bench import mp_ops

        sections.append(mp_ops.ops_table(mp_ops.bench_ops(progress=progress)))
    if "mp-ttft" in which:
        from vllm_kvplugin.bench import mp_serving

        sections.append(mp_serving.modes_table(mp_serving.run(args.out / "mp", args.lengths, args.repeats,
                                                              progress=progress)))
    if "pd" in which:
        from vllm_kvplugin.bench import pd

        sections.append(pd.pd_table(pd.run(args.out / "pd", repeats=args.repeats, progress=progress)))
    if "context" in which:
        from vllm_kvplugin.bench import context

        result = context.run(args.out / "context", args.context_lengths, args.repeats, progress=progress)
        sections.append(context.context_table(result))
        plot = context.context_plot(result, args.out / "context.png")
        sections.append(f"![Long-context TTFT per KV tier]({plot.name})")
    text = "\n\n".join(sections) + "\n"
    (args.out / "bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
