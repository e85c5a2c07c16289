# SPDX-License-Identifier: Apache-2.0
"""The direct-I/O tier's file throughput, per I/O engine, against ``dd`` with ``oflag=direct``/``iflag=direct``.

Runs in the benchmarking process, on real files, same bytes for all. Every
engine available here is measured in the same run beside dd (``posix-odirect``;
``nixl-posix`` where nixl is installed). Each round times dd and each engine
back to back; a ratio is engine / dd of the same round, reported as the median
and the spread (min-max) over rounds. Each round also takes the next order of
the contenders (all permutations in turn), moves each to another directory and
opens the engines afresh, with new staging buffers: on this VM, with engines
kept for a whole run, one engine came out 1.2-1.8x faster in every round, and
which one flipped from run to run; re-created per round, the same two differ
by 0.6-2x either way from round to round. Ours includes what a real store/load
does beyond the I/O: one file per chunk (create, rename), the CRC32C of every
payload and the copy through the aligned staging buffer; dd gets its best
case, one process streaming one file in chunk-sized direct I/Os.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vllm_kvplugin.storage.format import ChunkHeader, crc32c, encode_header
from vllm_kvplugin.storage.io import choose_io


@dataclass
class EngineRun:
    """One engine's throughput per round (GB/s) and its ratio to dd in the same round."""

    engine: str
    write_gbps: list[float] = field(default_factory=list)
    read_gbps: list[float] = field(default_factory=list)
    write_ratio: list[float] = field(default_factory=list)
    read_ratio: list[float] = field(default_factory=list)


@dataclass
class DirectIOResult:
    chunk_mib: int
    chunks: int
    rounds: int
    dd_write_gbps: list[float]
    dd_read_gbps: list[float]
    engines: list[EngineRun]
    skipped: dict[str, str]  # engine → why it was not measured here


def _drop(path: Path) -> None:
    for f in path.iterdir():
        f.unlink()


def dd_direct(op: str, path: Path, block_bytes: int, count: int) -> None:
    """dd's best case: one process, one file, ``count`` direct I/Os of ``block_bytes``
    (``op`` "write": from /dev/zero with ``oflag=direct``; "read": to /dev/null with ``iflag=direct``)."""
    dd = ["dd", f"bs={block_bytes}", f"count={count}", "status=none"]
    if op == "write":
        subprocess.run([*dd, "if=/dev/zero", f"of={path}", "oflag=direct"], check=True)
    else:
        subprocess.run([*dd, f"if={path}", "of=/dev/null", "iflag=direct"], check=True)


def available_engines(directory: Path):
    """``({name: engine}, {name: why not})`` for the engines this machine can run on ``directory``."""
    from vllm_kvplugin.storage.nixl_io import NixlUnavailable, open_nixl_io

    posix = choose_io(str(directory))
    engines, skipped = {posix.name: posix}, {}
    if not posix.direct:
        skipped["posix-odirect"] = f"O_DIRECT unsupported on {directory}"
    try:
        nixl = open_nixl_io(str(directory))
        engines[nixl.name] = nixl
    except NixlUnavailable as e:
        skipped["nixl-posix"] = str(e)
    return engines, skipped


def run(directory: Path, chunk_mib: int = 32, chunks: int = 16, rounds: int = 6,
        progress: Callable[[str], None] = print) -> DirectIOResult:
    """Write then read ``chunks`` files of ``chunk_mib`` MiB with dd and each engine, ``rounds`` times."""
    if shutil.which("dd") is None:
        raise RuntimeError("dd not found")
    directory.mkdir(parents=True, exist_ok=True)
    engines, skipped = available_engines(directory)
    order = ["dd", *engines]
    slots = [directory / f"slot{i}" for i in range(len(order))]  # contender k uses slot (k + round) % n
    for d in slots:
        d.mkdir(exist_ok=True)
    payload = os.urandom(chunk_mib << 20)
    header = encode_header(ChunkHeader("k", "int8", (len(payload),), "", len(payload), crc32c(payload)))
    total = chunks * len(payload)

    def step(op: str, name: str, d: Path) -> Callable[[], object]:
        if name == "dd":
            return lambda: dd_direct(op, d / "all", len(payload), chunks)
        io = engines[name]
        if op == "write":
            return lambda: [io.write(str(d / f"c{i}"), header, memoryview(payload)) for i in range(chunks)]
        return lambda: [io.read(str(d / f"c{i}"), "k") for i in range(chunks)]

    def timed(action: Callable[[], object]) -> float:
        start = time.perf_counter()
        action()
        return total / (time.perf_counter() - start) / 1e9

    dd_gbps: dict[str, list[float]] = {"write": [], "read": []}
    results = {name: EngineRun(name) for name in engines}
    orders = list(itertools.permutations(order))  # 6 for dd + 2 engines: who follows whom, balanced
    try:
        for n in range(rounds):
            for d in slots:
                _drop(d)
            if n:  # fresh engines, hence fresh staging buffers (see the module docstring)
                for io in engines.values():
                    io.close()
                engines = available_engines(directory)[0]
            turn = orders[n % len(orders)]
            where = {name: slots[(k + n) % len(slots)] for k, name in enumerate(order)}
            for op in ("write", "read"):
                got = {name: timed(step(op, name, where[name])) for name in turn}
                dd_gbps[op].append(got["dd"])
                for name, r in results.items():
                    getattr(r, f"{op}_gbps").append(got[name])
                    getattr(r, f"{op}_ratio").append(got[name] / got["dd"])
    finally:
        for d in slots:
            _drop(d)
            d.rmdir()
        for io in engines.values():
            io.close()
    med = statistics.median
    for r in results.values():
        progress(f"directio ({r.engine}): write {med(r.write_gbps):.2f} GB/s = {med(r.write_ratio):.2f}x dd, "
                 f"read {med(r.read_gbps):.2f} GB/s = {med(r.read_ratio):.2f}x dd")
    for name, why in skipped.items():
        progress(f"directio ({name}): not measured ({why})")
    return DirectIOResult(chunk_mib, chunks, rounds, dd_gbps["write"], dd_gbps["read"], list(results.values()),
                          skipped)
