# SPDX-License-Identifier: Apache-2.0
"""``vllm-kvplugin bench tiers`` round-trips KV bit-exactly through every tier and the peer, on real servers.

No timing is asserted (these machines are noisy); exactness, what each tier
holds, and that nothing is left behind are.
"""

import shutil

import pytest

from vllm_kvplugin.bench import tiers

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server not installed (ci/setup-env.sh installs Debian's redis-server)",
)


def test_every_tier_round_trips_bit_exact_with_nonzero_throughput(tmp_path):
    results = tiers.run(tmp_path, tokens=512, rounds=2, progress=lambda msg: None)
    assert [r.tier for r in results] == ["cpu", "directio", "directio-nixl", "redis", "s3", "lmcache-redis"]
    for r in results:
        assert r.bit_exact, r
        assert r.store_gbps > 0 and r.load_gbps > 0, r
    held = {r.tier: r.bytes_per_token for r in results}
    kv = 2 * 4 * 2 * 64 * 2  # the small shape, bf16: 2 KiB per token
    assert held["cpu"] == kv
    assert kv < held["directio"] < 1.1 * kv  # one 4 KiB header per 256-token chunk
    assert held["directio-nixl"] == held["directio"]  # the same files through another engine
    notes = {r.tier: r.note for r in results}
    assert notes["directio"].startswith("posix-odirect") and notes["directio-nixl"].startswith("nixl-posix")
    assert held["redis"] >= kv and held["lmcache-redis"] >= kv  # values plus keys and allocator rounding
    assert held["s3"] == held["directio"]  # the same header + payload per chunk, as objects
    assert not list(tmp_path.rglob("*.kvchunk"))  # the direct-I/O tier's files are removed
    table = tiers.tiers_table(results)
    assert "| cpu | small | 512 | 1 |" in table and "| redis | small |" in table and "| s3 | small |" in table


def test_unknown_tier_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tier"):
        tiers.run(tmp_path, tokens=256, tiers=("tape",), progress=lambda msg: None)


def test_read_ahead_bench_loads_bit_exact_at_each_depth_and_compares_with_dd(tmp_path):
    from vllm_kvplugin.bench import read_ahead

    rows, dd_gbps, chunk_bytes = read_ahead.run(tmp_path, tokens=1024, values=(1, 3), rounds=2,
                                                tier_names=("directio", "redis"), progress=lambda msg: None)
    assert [(r.tier, r.read_ahead) for r in rows] == [("directio", 1), ("directio", 3), ("redis", 1), ("redis", 3)]
    assert all(r.exact and len(r.load_gbps) == 2 and min(r.load_gbps) > 0 for r in rows)
    assert len(dd_gbps) == 2 and min(dd_gbps) > 0 and chunk_bytes == 256 * 2048
    table = read_ahead.read_ahead_table(rows, dd_gbps, chunk_bytes)
    assert "| directio | 3 |" in table and "| redis | 1 |" in table and "1.00x" in table
    assert not (tmp_path / "dd-raw.bin").exists()
