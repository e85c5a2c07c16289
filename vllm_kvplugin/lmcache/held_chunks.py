# SPDX-License-Identifier: Apache-2.0
"""Chunks verified at lookup, held in host memory until their load takes them.

Runs in the vLLM worker process: LMCache's lookup server thread adds and pins,
the forward thread takes (the load), either thread unpins.

Why hold: vLLM's scheduler counts a lookup's tokens as computed before the load
runs. If the chunk then turned out damaged or gone, the only way back is a load
error, which vLLM's default ``kv_load_failure_policy`` ("fail") turns into a
failed request and vllm-gaudi's runner drops altogether (the request then runs
on whatever its blocks held). A chunk that was read and checked at lookup and
kept since cannot fail its load.

Each held chunk is one LMCache ``MemoryObj`` (one reference owned here) with a
pin count: one per lookup that promised it. The last unpin releases it. Holds
older than ``max_age_s`` are released too: LMCache's lookup pins of a request
that never reaches its load are not always unpinned, and host memory must not
leak; such a chunk's load reads its file again (checked again, a miss if bad).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Hold:
    obj: object  # lmcache MemoryObj
    pins: int
    since: float


class HeldChunks:
    """A thread-safe map of chunk name -> verified ``MemoryObj`` and its lookup pins.

    Args:
        on_release: called with the name once a hold ends (last unpin, age, clear).
        max_age_s: holds older than this are released at the next ``add``.
    """

    def __init__(self, on_release: Callable[[str], None] = lambda name: None, max_age_s: float = 120.0):
        self._holds: dict[str, _Hold] = {}
        self._lock = threading.Lock()
        self._on_release = on_release
        self._max_age_s = max_age_s

    def __len__(self) -> int:
        with self._lock:
            return len(self._holds)

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._holds

    def pin(self, name: str) -> bool:
        """One more lookup promises ``name``; False if it is not held."""
        with self._lock:
            hold = self._holds.get(name)
            if hold is not None:
                hold.pins += 1
            return hold is not None

    def add(self, name: str, obj) -> None:
        """Hold ``obj`` (its reference passes to this map) for one lookup pin."""
        now = time.monotonic()
        with self._lock:
            stale = [n for n, h in self._holds.items() if now - h.since > self._max_age_s]
            released = [(n, self._holds.pop(n).obj) for n in stale]
            if name in self._holds:  # another lookup verified it meanwhile
                self._holds[name].pins += 1
                released.append((None, obj))
            else:
                self._holds[name] = _Hold(obj, 1, now)
        self._release(released)

    def take(self, name: str):
        """A new reference to the held object for a load (the hold stays until unpinned), or None."""
        with self._lock:
            hold = self._holds.get(name)
            if hold is None:
                return None
            hold.obj.ref_count_up()
            return hold.obj

    def unpin(self, name: str) -> bool:
        """One lookup pin of ``name`` is released; True if that ended its hold."""
        with self._lock:
            hold = self._holds.get(name)
            if hold is None:
                return False
            hold.pins -= 1
            if hold.pins > 0:
                return False
            del self._holds[name]
        self._release([(name, hold.obj)])
        return True

    def clear(self) -> None:
        with self._lock:
            released = [(n, h.obj) for n, h in self._holds.items()]
            self._holds.clear()
        self._release(released)

    def _release(self, released) -> None:
        for name, obj in released:
            obj.ref_count_down()
            if name is not None:
                self._on_release(name)
