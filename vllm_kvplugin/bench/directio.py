# SPDX-License-Identifier: Apache-2.0
"""The direct-I/O tier's file throughput against ``dd`` with ``oflag=direct``/``iflag=direct``.

Runs in the benchmarking process, on real files in one directory, same bytes
for both. Ours includes what a real store/load does beyond the I/O: one file
per chunk (create, rename), the CRC32C of every payload and the copy through
the aligned staging buffer; dd gets its best case, one process streaming one
file in chunk-sized direct I/Os.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_kvplugin.storage.format import ChunkHeader, crc32c, encode_header
from vllm_kvplugin.storage.io import choose_io


@dataclass
class DirectIOResult:
    engine: str
    chunk_mib: int
    chunks: int
    write_gbps: float
    read_gbps: float
    dd_write_gbps: float
    dd_read_gbps: float


def _drop(path: Path) -> None:
    for f in path.iterdir():
        f.unlink()


def run(directory: Path, chunk_mib: int = 32, chunks: int = 16, rounds: int = 3,
        progress: Callable[[str], None] = print) -> DirectIOResult:
    """Write then read ``chunks`` files of ``chunk_mib`` MiB, ours and dd alternating per round."""
    if shutil.which("dd") is None:
        raise RuntimeError("dd not found")
    directory.mkdir(parents=True, exist_ok=True)
    ours_dir, dd_dir = directory / "ours", directory / "dd"
    ours_dir.mkdir(exist_ok=True)
    dd_dir.mkdir(exist_ok=True)
    io = choose_io(str(ours_dir))
    payload = os.urandom(chunk_mib << 20)
    header = encode_header(ChunkHeader("k", "int8", (len(payload),), "", len(payload), crc32c(payload)))
    total = chunks * len(payload)
    samples = {"w": [], "r": [], "dw": [], "dr": []}
    for _ in range(rounds):
        _drop(ours_dir)
        _drop(dd_dir)
        start = time.perf_counter()
        for i in range(chunks):
            io.write(str(ours_dir / f"c{i}"), header, memoryview(payload))
        samples["w"].append(total / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        for i in range(chunks):
            io.read(str(ours_dir / f"c{i}"), "k")
        samples["r"].append(total / (time.perf_counter() - start) / 1e9)
        # dd's best case: one process, one file, the same bytes in chunk-sized direct I/Os.
        dd = ["dd", f"bs={chunk_mib}M", f"count={chunks}", "status=none"]
        start = time.perf_counter()
        subprocess.run([*dd, "if=/dev/zero", f"of={dd_dir / 'all'}", "oflag=direct"], check=True)
        samples["dw"].append(total / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        subprocess.run([*dd, f"if={dd_dir / 'all'}", "of=/dev/null", "iflag=direct"], check=True)
        samples["dr"].append(total / (time.perf_counter() - start) / 1e9)
    _drop(ours_dir)
    _drop(dd_dir)
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = DirectIOResult(io.name, chunk_mib, chunks, med["w"], med["r"], med["dw"], med["dr"])
    progress(f"directio ({io.name}): write {med['w']:.2f} GB/s vs dd {med['dw']:.2f}, "
             f"read {med['r']:.2f} GB/s vs dd {med['dr']:.2f}")
    return result
