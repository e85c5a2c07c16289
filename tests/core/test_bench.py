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
    assert {r.mode for r in results} == {"plane-major rows", "block-major rows", "strided"}
    assert all(r.store_ratio > 0 and r.load_ratio > 0 and r.copy_gbps > 0 for r in results)
    assert all(r.layerwise_store > 0 and r.layerwise_load > 0 for r in results)
    assert "| LBHNC | 16 | plane-major rows |" in report.mover_table(results)


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
