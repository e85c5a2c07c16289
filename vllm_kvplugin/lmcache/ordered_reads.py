# SPDX-License-Identifier: Apache-2.0
"""Reads answered in order with several in flight: the read-ahead of the checksummed tiers.

Runs in the vLLM worker process, on whichever thread asks (LMCache's lookup
thread for a pinned lookup, the forward thread for a load); the reads run on
the tier's reader pool.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future


def read_in_order(pool: Executor, depth: int, names: list[str], read: Callable[[str], object],
                  undo: Callable[[str, object], None]) -> Iterator[tuple[str, object]]:
    """``(name, read(name))`` in the order of ``names``, with up to ``depth`` reads running on ``pool``.

    Closing the iterator early (a miss ends a prefix) cancels the reads not
    started and passes those already done to ``undo`` (release what they hold).
    """
    upcoming = iter(names)
    running: deque[tuple[str, Future]] = deque()

    def start_next() -> None:
        name = next(upcoming, None)
        if name is not None:
            running.append((name, pool.submit(read, name)))

    try:
        for _ in range(depth):
            start_next()
        while running:
            name, future = running.popleft()
            result = future.result()
            start_next()
            yield name, result
    finally:
        for name, future in running:
            if not future.cancel() and future.exception() is None:
                undo(name, future.result())
