# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: the locally generated test model, process environment."""

import os

import pytest

# Tests never reach the network; LMCache would otherwise start a usage reporter.
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight Llama (4 layers, 2 KV heads, head 32, vocab 1024) with a word-level tokenizer."""
    from vllm_kvplugin.demo.model import generate_model

    return str(generate_model(tmp_path_factory.mktemp("model") / "tiny-llama"))
