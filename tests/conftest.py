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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3 server (SeaweedFS on loopback) for the tests that need one; a test that kills it starts
    it again."""
    from vllm_kvplugin.bench.s3_server import SeaweedS3

    with SeaweedS3(tmp_path_factory.mktemp("s3")) as server:
        yield server
