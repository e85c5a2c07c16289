# SPDX-License-Identifier: Apache-2.0
"""A prefill (``kv_producer``) and a decode (``kv_consumer``) ``vllm serve`` sharing one directory.

The NFS/VAST case on one machine: both instances point the direct-I/O tier at
the same directory, with LMCache's CPU tier off so hits can only come from the
files. The producer stores and never loads; the consumer loads and never stores.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.e2e.engines import all_ready, directio_connector, engine_env
from vllm_kvplugin.demo.model import random_prompt
from vllm_kvplugin.demo.server import VllmServer

pytestmark = pytest.mark.e2e

CHUNK = 64
WORDS = 500  # 501 tokens with BOS: 7 whole chunks
EXPECTED_HIT = (WORDS + 1) // CHUNK * CHUNK


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-kv")


@pytest.fixture(scope="module")
def pd_pair(shared, tmp_path_factory, tiny_model):
    logs = tmp_path_factory.mktemp("pd-pair")
    servers = [
        VllmServer(tiny_model, directio_connector(shared, role), logs / f"{role}.log", env=engine_env())
        for role in ("kv_producer", "kv_consumer")
    ]
    with all_ready(servers):
        yield servers


def chunk_files(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*.kvchunk")}


def wait_for_files(directory: Path, count: int, timeout: float = 10.0) -> set[Path]:
    """The producer's tier writes asynchronously; wait until ``count`` chunk files are in place."""
    deadline = time.monotonic() + timeout
    while len(files := chunk_files(directory)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return files


def test_prefix_prefilled_by_the_producer_is_loaded_by_the_consumer(pd_pair, shared):
    producer, consumer = pd_pair
    prompt = random_prompt(WORDS, random.Random(11))
    cold = producer.complete(prompt, max_tokens=16)
    assert cold.cached_tokens == 0
    assert len(wait_for_files(shared, EXPECTED_HIT // CHUNK)) == EXPECTED_HIT // CHUNK
    warm = consumer.complete(prompt, max_tokens=16)
    assert warm.cached_tokens == EXPECTED_HIT
    assert warm.text == cold.text


def test_producer_never_loads(pd_pair):
    producer, _ = pd_pair
    prompt = random_prompt(WORDS, random.Random(12))
    first = producer.complete(prompt)
    time.sleep(0.5)
    again = producer.complete(prompt)  # stored by itself a moment ago, yet recomputed
    assert first.cached_tokens == again.cached_tokens == 0
    assert again.text == first.text


def test_consumer_never_stores(pd_pair, shared):
    _, consumer = pd_pair
    before = chunk_files(shared)
    prompt = random_prompt(WORDS, random.Random(13))
    first = consumer.complete(prompt)
    time.sleep(1.0)
    again = consumer.complete(prompt)
    assert chunk_files(shared) == before
    assert first.cached_tokens == again.cached_tokens == 0
    assert again.text == first.text
