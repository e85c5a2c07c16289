# SPDX-License-Identifier: Apache-2.0
"""The worker half of the asynchronous save contract: when blocks may be written and freed again.

The saves here are real threads blocked on events, so each test controls
exactly when a step's store finishes. The end-to-end half (a real vLLM with
preemption, aborts and a leak check, saving asynchronously) is
``tests/e2e/test_soak.py``.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from vllm_kvplugin.lmcache.async_save import BackgroundSaver
from vllm_kvplugin.lmcache.step_metadata import PortableConnectorMetadata


def step(*req_ids: str) -> SimpleNamespace:
    """LMCache's metadata for one step, as far as the saver reads it."""
    return SimpleNamespace(requests=[SimpleNamespace(req_id=r) for r in req_ids])


def notes(kept=(), preempted=()) -> PortableConnectorMetadata:
    return PortableConnectorMetadata.extend(step(), kept=frozenset(kept), preempted=frozenset(preempted))


class GatedSaves:
    """A save function whose steps finish only when the test opens their gate."""

    def __init__(self):
        self.gates: dict[int, threading.Event] = {}
        self.started: list[tuple[str, ...]] = []
        self.finished: list[tuple[str, ...]] = []

    def __call__(self, metadata) -> None:
        ids = tuple(r.req_id for r in metadata.requests)
        self.started.append(ids)
        self.gates.setdefault(len(self.started) - 1, threading.Event()).wait(10)
        self.finished.append(ids)

    def open(self, index: int) -> None:
        self.gates.setdefault(index, threading.Event()).set()


@pytest.fixture
def saves():
    gated = GatedSaves()
    saver = BackgroundSaver(gated)
    yield gated, saver
    for i in range(8):
        gated.open(i)
    saver.close()


def wait_until(predicate, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_submit_returns_before_the_store_is_done(saves):
    gated, saver = saves
    saver.submit(step("a"))  # would hang here if the store ran on the calling thread
    wait_until(lambda: gated.started == [("a",)])
    assert gated.finished == []


def test_a_kept_request_is_reported_only_once_its_saves_are_done(saves):
    gated, saver = saves
    saver.submit(step("a", "b"))
    saver.before_step(notes(kept={"a"}))
    assert saver.finished({"a"}) == set()  # its blocks must stay allocated
    gated.open(0)
    wait_until(lambda: gated.finished)
    assert saver.finished(set()) == {"a"}
    assert saver.finished(set()) == set()  # reported exactly once


def test_a_kept_request_waits_for_its_newest_save_not_just_the_first(saves):
    gated, saver = saves
    saver.submit(step("a"))
    saver.submit(step("a"))  # chunked prefill: a second step stores more of it
    saver.before_step(notes(kept={"a"}))
    gated.open(0)
    wait_until(lambda: len(gated.finished) == 1)
    assert saver.finished({"a"}) == set()
    gated.open(1)
    wait_until(lambda: len(gated.finished) == 2)
    assert saver.finished(set()) == {"a"}


def test_a_kept_request_without_saves_is_reported_at_once(saves):
    _, saver = saves
    saver.before_step(notes(kept={"idle"}))
    assert saver.finished({"idle"}) == {"idle"}


def test_a_preemption_waits_for_the_preempted_requests_save_before_the_step_runs(saves):
    gated, saver = saves
    saver.submit(step("victim"))
    stepped = threading.Event()

    def next_step():
        saver.before_step(notes(preempted={"victim"}))  # its blocks may be rewritten by this step
        stepped.set()

    threading.Thread(target=next_step, daemon=True).start()
    assert not stepped.wait(0.3), "the step began while the preempted request's save was reading its blocks"
    gated.open(0)
    assert stepped.wait(5)
    assert gated.finished == [("victim",)]


def test_a_preemption_of_a_request_without_pending_saves_does_not_wait(saves):
    gated, saver = saves
    saver.submit(step("other"))  # still running, and unrelated
    began = time.monotonic()
    saver.before_step(notes(preempted={"victim"}))
    assert time.monotonic() - began < 0.2
    assert gated.finished == []


def test_steps_are_stored_in_order_on_one_thread(saves):
    gated, saver = saves
    for name in "abc":
        saver.submit(step(name))
    for i in range(3):
        gated.open(i)
    saver.drain()
    assert gated.finished == [("a",), ("b",), ("c",)]


def test_a_bounded_drain_gives_up_on_a_stuck_save_and_a_later_one_sees_it_done(saves):
    """The PD hand-off waits for queued stores no longer than its bound (vllm_kvplugin.lmcache.handoff)."""
    gated, saver = saves
    saver.submit(step("stuck"))
    began = time.monotonic()
    assert saver.drain(0.1) is False
    assert time.monotonic() - began < 1.0
    gated.open(0)
    assert saver.drain(5.0) is True


def test_close_completes_queued_saves_so_no_stored_kv_is_lost():
    done = []
    saver = BackgroundSaver(lambda m: (time.sleep(0.05), done.append(m.requests[0].req_id)))
    for name in "xyz":
        saver.submit(step(name))
    saver.close()
    assert done == ["x", "y", "z"]


def test_a_step_without_requests_queues_nothing(saves):
    gated, saver = saves
    saver.submit(step())
    saver.drain()
    assert gated.started == []
