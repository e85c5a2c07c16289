# SPDX-License-Identifier: Apache-2.0
"""The benchmark functions behind ``vllm-kvplugin bench`` run and report what they measured.

No timing is asserted here (these machines are noisy); exactness and structure are.
"""

import pytest

from vllm_kvplugin.bench import report
from vllm_kvplugin.bench.mover import KVShape, bench_mover
from vllm_kvplugin.bench.serving import Floors, LengthResult, MissResult


def test_mover_bench_reports_every_layout_and_block_size():
    results = bench_mover(
        layouts=("LBHNC", "BLHNC", "LHBNC"), block_sizes=(16, 32), shape=KVShape(layers=2, kv_heads=2, head_size=16),
        chunk_tokens=64, cache_gib=0.01, rounds=2,
    )
    assert [(r.layout, r.block_size) for r in results] == [
        ("LBHNC", 16), ("LBHNC", 32), ("BLHNC", 16), ("BLHNC", 32), ("LHBNC", 16), ("LHBNC", 32)]
    assert {r.mode for r in results} == {"plane-major rows", "block-major rows", "strided rows"}
    assert all(r.store_ratio > 0 and r.load_ratio > 0 and r.copy_gbps > 0 for r in results)
    assert all(r.layerwise_store > 0 and r.layerwise_load > 0 for r in results)
    assert "| LBHNC | 16 | plane-major rows |" in report.mover_table(results)


def test_mover_shapes_table_has_a_row_per_shape_and_layout():
    from vllm_kvplugin.bench.mover import bench_mover_shapes

    shapes = {"tiny": KVShape(layers=2, kv_heads=1, head_size=16), "wide": KVShape(layers=1, kv_heads=4, head_size=32)}
    results = bench_mover_shapes(shapes, layouts=("LBHNC", "LHBNC"), block_sizes=(16, 32), rounds=2, cache_gib=0.01)
    assert [(r.shape_name, r.layout, r.block_size) for r in results] == [
        (s, layout, b) for s in shapes for layout in ("LBHNC", "LHBNC") for b in (16, 32)]
    table = report.mover_shapes_table(results)
    assert table.count("| tiny |") == 2 and table.count("| wide |") == 2 and "| block 16 | block 32 |" in table


def test_context_scaling_round_trips_bit_exact_through_lmcache():
    from vllm_kvplugin.bench import scaling

    (result,) = scaling.run(token_counts=(2048,), progress=lambda msg: None)
    assert result.bit_exact and result.hit_tokens == 2048
    assert result.peak_rss_mib > 0
    assert "| 2048 | 4 |" in report.scaling_table([result])


def test_serving_report_and_plot(tmp_path):
    results = [
        LengthResult(1024, [0.2], [0.03], [0.21], [0.035], [0.06], [0.002], [0.012], 1023),
        LengthResult(4096, [1.1], [0.05], [1.05], [0.06], [], [0.004], [], 4095, "ExampleConnector failed: boom"),
    ]
    both = ("LMCachePortableConnector", "LMCachePortableConnector, async save")
    miss = MissResult({"no connector": 0.2, both[0]: 0.21, both[1]: 0.2},
                      {"no connector": 100.0, both[0]: 99.0, both[1]: 101.0},
                      {"no connector": 0.010, both[0]: 0.0102, both[1]: 0.0112},
                      {both[0]: [0.004, 0.006, 0.005], both[1]: [0.0001]})
    table = report.ttft_table(results, Floors(ours_s=0.02, example_s=0.02))
    assert "| 1024 | 200 | 30 | 35 | 60 |" in table and "ExampleConnector failed: boom" in table
    assert "| 2.0 / 12.0 | 6.0x (yes) |" in table
    misses = report.miss_table(results, miss)
    assert "| throughput, same batches | 100.00 tok/s | 99.00 tok/s | 0.990x | 101.00 tok/s | 1.010x | yes / yes |" in misses
    assert "| 10.20 ms | 1.020x | 11.20 ms | 1.120x | yes / **no** |" in misses
    assert "| P4: forward thread held by a storing step (median) | - | 5.00 ms | - | 0.10 ms | - | - |" in misses
    png = report.ttft_plot(results, tmp_path / "ttft.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_p3_is_judged_on_the_interval_of_paired_ratios_not_on_one_run():
    from vllm_kvplugin.bench.paired import paired_ratio_ci

    base = [0.30, 0.36, 0.31, 0.40, 0.33, 0.29, 0.35, 0.38, 0.32, 0.34] * 2  # noisy rounds
    steady = paired_ratio_ci([b * 1.05 for b in base], base)  # 5% slower in every round, whatever the noise
    assert steady.ratio == pytest.approx(1.05) and steady.low == pytest.approx(1.05) and steady.rounds == 20
    assert steady.verdict(at_most=1.02) == "**no**"
    within = paired_ratio_ci([b * (1.0 + (0.01 if i % 2 else -0.01)) for i, b in enumerate(base)], base)
    assert within.low < 1.0 < within.high < 1.02 and within.verdict(at_most=1.02) == "yes"
    straddling = paired_ratio_ci([b * (1.0 + (0.06 if i % 2 else -0.04)) for i, b in enumerate(base)], base)
    assert straddling.low < 1.02 < straddling.high and straddling.verdict(at_most=1.02) == "not resolved"
    assert within.verdict(at_least=0.98) == "yes"
    with pytest.raises(ValueError):
        paired_ratio_ci([1.0], [1.0])

    names = ("no connector", "LMCachePortableConnector", "LMCachePortableConnector, async save")
    miss = MissResult(dict.fromkeys(names, 0.3), dict.fromkeys(names, 100.0), dict.fromkeys(names, 0.01),
                      ratio_ci={"ttft": {names[1]: within, names[2]: steady}})
    row = next(line for line in report.miss_table([], miss).splitlines() if line.startswith("| mean TTFT"))
    assert f"| {within} |" in row and f"| {steady} |" in row and row.endswith("| yes / **no** |")
    assert "95% CI" in row and "20 rounds" in row

    control = "no connector, second engine"  # the A/A control is shown beside the connectors, never judged
    miss = MissResult(dict.fromkeys((*names, control), 0.3), dict.fromkeys((*names, control), 100.0),
                      dict.fromkeys((*names, control), 0.01),
                      ratio_ci={"ttft": {names[1]: within, names[2]: within, control: steady}})
    table = report.miss_table([LengthResult(1024, [0.2], [0.03], [0.21])], miss)
    assert "| A/A control: 2nd engine, no connector | ratio | within target |" in table
    row = next(line for line in table.splitlines() if line.startswith("| mean TTFT"))
    assert row.endswith(f"| {steady} | yes / yes |")
    assert "| TTFT, one fresh 1024-token prompt (stores it) | 200 ms | 210 ms | 1.050x | - | - | - | - | **no** |" in table


def test_directio_bench_compares_with_dd_on_real_files(tmp_path):
    from vllm_kvplugin.bench import directio

    result = directio.run(tmp_path, chunk_mib=1, chunks=2, rounds=2, progress=lambda msg: None)
    engines = [e.engine for e in result.engines]
    assert engines[0] == "posix-odirect"
    assert "nixl-posix" in engines or "nixl-posix" in result.skipped  # measured beside dd, or why not
    assert len(result.dd_write_gbps) == len(result.dd_read_gbps) == 2
    for e in result.engines:
        assert len(e.write_gbps) == len(e.read_ratio) == 2 and min(e.write_gbps + e.read_gbps) > 0
        assert e.write_ratio == [w / d for w, d in zip(e.write_gbps, result.dd_write_gbps)]
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]  # cleans up after itself
    table = report.directio_table(result)
    assert "| posix-odirect | write |" in table and "x (" in table


def test_mp_ops_bench_times_both_device_ops_on_the_same_call():
    from vllm_kvplugin.bench import mp_ops

    (r,) = mp_ops.bench_ops({"tiny": KVShape(layers=2, kv_heads=2, head_size=16)}, block_sizes=(32,), tokens=512,
                            cache_gib=0.01, rounds=3)
    assert (r.shape, r.block_size, r.tokens) == ("tiny", 32, 512)
    assert set(r.ratios) == {"ours store", "lmcache store", "ours load", "lmcache load"}
    assert all(len(v) == 3 and min(v) > 0 for v in r.ratios.values())
    assert "| tiny | 32 | 512 |" in mp_ops.ops_table([r])


def test_pd_table_reports_ratios_to_colocated_and_output_equality():
    from vllm_kvplugin.bench.pd import Round, SetupResult, pd_table

    colocated = SetupResult("colocated, no connector", [Round([0.1, 0.3], [0.01, 0.01], 2.0, 64, ["a", "b", "c"])])
    ours = SetupResult("PD, LMCachePortableConnector", [Round([0.2, 0.2], [0.02, 0.02], 4.0, 64, ["a", "x", None])],
                       decode_loaded_tokens=768)
    table = pd_table([colocated, ours])
    assert "| colocated, no connector | 200 (200–200) | 10.0 (10.0–10.0) | 32.0 (32.0–32.0) | 1.00x (1.00–1.00) | 3/3 | 0 | — |" in table
    assert "| PD, LMCachePortableConnector | 200 (200–200) | 20.0 (20.0–20.0) | 16.0 (16.0–16.0) | 0.50x (0.50–0.50) | 1/3 | 1 | 768 |" in table


def test_nixl_servers_keep_openmp_off_the_cores_vllms_nixl_worker_reserves(monkeypatch):
    """vLLM's NIXL worker on CPU moves its main thread to the last core of each NUMA node (bench/pd.py)."""
    from vllm.platforms.cpu import CpuPlatform

    from vllm_kvplugin.bench.pd import nixl_omp_bind

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(CpuPlatform, "discover_numa_topology", classmethod(lambda cls: [[0, 1, 2, 3], [4, 5, 6, 7]]))
    assert nixl_omp_bind() == "0,1,2,4,5,6"
    monkeypatch.setattr(CpuPlatform, "discover_numa_topology", classmethod(lambda cls: []))
    assert nixl_omp_bind() == "0,1,2,3,4,5,6,7"  # no NUMA information: vLLM reserves nothing
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(CpuPlatform, "discover_numa_topology", classmethod(lambda cls: [[0, 1, 2, 3]]))
    assert nixl_omp_bind() == "3"  # nothing else allowed: OpenMP keeps the one core


def _context_result():
    from vllm_kvplugin.bench.context import ContextResult, ContextRow

    gib = 2**30
    rows = [
        ContextRow(131072, "cold", [200.0], peak_rss=(6 * gib, 4 * gib)),
        ContextRow(131072, "cpu", [0.30, 0.25, 0.35], [131040] * 3, [0.1, 0.1, 0.1], [], (6 * gib, 4 * gib)),
        # 131040 tokens x 4096 B = 0.537 GB in 0.5 s = 1.07 GB/s; raw 1.0-1.2 GB/s
        ContextRow(131072, "disk", [1.0, 2.0, 4.0], [131040] * 3, [0.5, 0.5, 0.5], [1.0, 1.2, 1.1], (5 * gib, 3 * gib)),
        ContextRow(131072, "redis", [1.0], [4096], [0.5], [2.0], (5 * gib, 3 * gib)),
    ]
    return ContextResult(rows, bytes_per_token=4096, io_engine="posix-odirect", floor_s=0.02)


def test_context_table_reports_speedup_ratio_and_goals():
    from vllm_kvplugin.bench.context import context_table, kv_bytes_per_token, vm_hwm_bytes
    from vllm_kvplugin.bench.serving import BENCH_SHAPE

    result = _context_result()
    disk = result.row(131072, "disk")
    assert result.load_gbps(disk) == pytest.approx([131040 * 4096 / 0.5 / 1e9] * 3)
    assert result.load_ratios(disk) == pytest.approx([1.07341 / 1.0, 1.07341 / 1.2, 1.07341 / 1.1], rel=1e-4)
    lines = {line.split(" | ")[2]: line for line in context_table(result).splitlines() if line.startswith("| 131072 |")}
    assert lines["cold prefill"] == ("| 131072 | 512 | cold prefill | 200000 (200000–200000) | 1 | - | - | - | - | - "
                                     "| 6.0 (4.0) |")
    # cold / median warm = 200 / 2 = 100x: the disk goal at 128K is met; the ratio's median 98% passes 90%
    assert ("| direct-I/O tier, after a restart | 2000 (1000–4000) | 3 | 100x (yes) | 131040 | 1.07 (1.07–1.07) "
            "| 1.10 (1.00–1.20) | 98% (89%–107%) (yes) | 5.0 (3.0) |") in lines["direct-I/O tier, after a restart"]
    assert "| 667x | 131040 | 5.37 (5.37–5.37) | - | - |" in lines["LMCache CPU tier"]  # no goal, no raw
    redis = lines["Redis tier, after a restart"]
    assert "| 200x | 4096 (**fewer than the CPU tier**) |" in redis and "| 2% (2%–2%) (**no**) |" in redis
    assert kv_bytes_per_token(BENCH_SHAPE) == 4096  # 4 layers x K,V x 2 heads x 64 x float32
    assert vm_hwm_bytes("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t1024 kB\n") == 2 * 2**20
    assert vm_hwm_bytes("Name:\tkthread\n") == 0


def test_context_plot(tmp_path):
    from vllm_kvplugin.bench.context import context_plot

    png = context_plot(_context_result(), tmp_path / "context.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
