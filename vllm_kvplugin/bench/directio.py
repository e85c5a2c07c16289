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


def run(directory: Path, chunk_mib: int = 32, chunks: int = 16, rounds: int = 5,
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
    # dd's best case: one process, one file, the same bytes in chunk-sized direct I/Os.
    dd = ["dd", f"bs={chunk_mib}M", f"count={chunks}", "status=none"]

    def timed(key: str, action: Callable[[], object]) -> None:
        start = time.perf_counter()
        action()
        samples[key].append(total / (time.perf_counter() - start) / 1e9)

    steps = {
        "w": lambda: [io.write(str(ours_dir / f"c{i}"), header, memoryview(payload)) for i in range(chunks)],
        "dw": lambda: subprocess.run([*dd, "if=/dev/zero", f"of={dd_dir / 'all'}", "oflag=direct"], check=True),
        "r": lambda: [io.read(str(ours_dir / f"c{i}"), "k") for i in range(chunks)],
        "dr": lambda: subprocess.run([*dd, f"if={dd_dir / 'all'}", "of=/dev/null", "iflag=direct"], check=True),
    }
    for n in range(rounds):  # each pair back to back, who goes first alternating: the VM's drift hits both
        _drop(ours_dir)
        _drop(dd_dir)
        for pair in (("w", "dw"), ("r", "dr")):
            for key in pair if n % 2 == 0 else reversed(pair):
                timed(key, steps[key])
    _drop(ours_dir)
    _drop(dd_dir)
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = DirectIOResult(io.name, chunk_mib, chunks, med["w"], med["r"], med["dw"], med["dr"])
    progress(f"directio ({io.name}): write {med['w']:.2f} GB/s vs dd {med['dw']:.2f}, "
             f"read {med['r']:.2f} GB/s vs dd {med['dr']:.2f}")
    return result
