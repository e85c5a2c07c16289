# SPDX-License-Identifier: Apache-2.0
"""vLLM's asynchronous save contract around LMCache's stores: no forward pass waits for a save.

LMCache 0.5.6 stores a step's KV inside ``wait_for_save``, so the next step
cannot start until every chunk has been gathered and handed to its tiers. With
``kvplugin.save_mode: async`` the connector instead runs that same store on one
background thread of the worker, in step order, while the next steps run.

That is only safe while nothing rewrites the blocks a save is reading:

- a running request never rewrites its saved (prompt) tokens;
- a finished request keeps its blocks: the engine core's ``request_finished``
  returns True, and the blocks go back to vLLM once every worker has reported
  the request through ``get_finished`` (:meth:`BackgroundSaver.finished`);
- a preempted request's blocks are freed at once and may be handed to another
  request in the very step that preempted it, so that step first waits for the
  request's saves (:meth:`BackgroundSaver.before_step`, called from
  ``bind_connector_metadata``, before any load or forward writes a block).

The engine core tells the workers which requests it kept and which it
preempted through
:class:`~vllm_kvplugin.lmcache.step_metadata.PortableConnectorMetadata`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorMetadata

from vllm_kvplugin.lmcache.step_metadata import PortableConnectorMetadata

SAVE_MODES = ("sync", "async")


class BackgroundSaver:
    """Worker side: runs each step's store on one thread and says when a request's saves are done.

    Args:
        save: stores one step, given LMCache's metadata for it; must not raise
            (a failed store is a cache miss later, never an error now).
    """

    def __init__(self, save: Callable[[LMCacheConnectorMetadata], None]):
        self._save = save
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvplugin-save")
        self._last_job: dict[str, Future] = {}  # request -> newest job that saves for it
        self._unreported: set[str] = set()  # kept requests not yet returned by finished()
        self._lock = threading.Lock()

    def before_step(self, metadata: PortableConnectorMetadata) -> None:
        """Before the step's loads and forward: finish preempted requests' saves, note kept requests."""
        with self._lock:
            jobs = [self._last_job.pop(r) for r in metadata.preempted if r in self._last_job]
            self._unreported |= metadata.kept
        wait(jobs)

    def submit(self, metadata: LMCacheConnectorMetadata) -> None:
        """After the step's forward: queue its store; returns at once."""
        req_ids = [r.req_id for r in getattr(metadata, "requests", ())]
        if not req_ids:
            return
        job = self._pool.submit(self._save, metadata)
        with self._lock:
            for r in req_ids:
                self._last_job[r] = job

    def finished(self, finished_req_ids: Iterable[str]) -> set[str]:
        """Kept requests whose saves are all done: vLLM may free their blocks now."""
        with self._lock:
            done = {r for r in self._unreported if r not in self._last_job or self._last_job[r].done()}
            self._unreported -= done
            # Requests that finished without being kept computed no blocks: nothing to wait for.
            for r in done | (set(finished_req_ids) - self._unreported):
                self._last_job.pop(r, None)
        return done

    def unsettled(self) -> int:
        """Requests with a save this saver still tracks (0 once traffic stops: nothing leaks)."""
        with self._lock:
            return len(self._last_job.keys() | self._unreported)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Block until every queued save is done (or ``timeout_s`` passed: then False)."""
        with self._lock:
            jobs = list(self._last_job.values())
        return not wait(jobs, timeout=timeout_s).not_done

    def close(self) -> None:
        """Finish queued saves (so that no stored KV is lost at shutdown) and stop the thread."""
        self._pool.shutdown(wait=True)
