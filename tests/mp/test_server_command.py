# SPDX-License-Identifier: Apache-2.0
"""``vllm-kvplugin server``: the ``lmcache server`` line it runs (no server started here)."""

import json
import shlex
import subprocess
import sys

import pytest

from vllm_kvplugin.mp.server import check_shm_space


def command(*args) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "vllm_kvplugin.cli", "server", "--print-command", *args],
                         capture_output=True, text=True, check=True).stdout
    return shlex.split(out.strip().splitlines()[-1])


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_defaults_serve_every_worker_kind_from_shared_memory():
    argv = command("--port", "6001")
    assert argv[1:5] == ["-m", "lmcache.cli.main", "server", "--host"]
    assert flag(argv, "--supported-transfer-mode") == "auto"
    assert flag(argv, "--eviction-policy") == "LRU"
    assert flag(argv, "--shm-name") == "kvplugin-6001"
    assert flag(argv, "--host") == "127.0.0.1"  # loopback unless told otherwise
    assert flag(argv, "--chunk-size") == "128"  # half LMCache's 256: half the tail prefilled again
    assert "--l2-adapter" not in argv
    assert flag(command("--chunk-size", "256"), "--chunk-size") == "256"


def test_a_stock_server_gets_lmcaches_own_transfer_mode_and_chunk_size(tmp_path):
    from vllm_kvplugin.mp.server import ServerProcess

    argv = ServerProcess(tmp_path, stock=True).argv
    assert "--supported-transfer-mode" not in argv and "--chunk-size" not in argv
    assert flag(ServerProcess(tmp_path).argv, "--chunk-size") == "128"


def test_directio_path_adds_our_l2_adapter_and_extra_flags_pass_through(tmp_path):
    argv = command("--no-shm", "--directio-path", str(tmp_path), "--directio-max-size-gb", "3", "--",
                   "--max-workers", "2")
    assert "--shm-name" not in argv
    adapter = json.loads(flag(argv, "--l2-adapter"))
    assert adapter == {"type": "plugin", "module_path": "vllm_kvplugin.mp.l2_adapter",
                       "class_name": "DirectIOL2Adapter",
                       "adapter_params": {"path": str(tmp_path), "max_size_gb": 3.0, "io_threads": 2}}
    assert argv[-2:] == ["--max-workers", "2"]


def test_the_directio_engine_is_passed_to_the_adapter_only_when_set(tmp_path):
    argv = command("--directio-path", str(tmp_path), "--directio-engine", "nixl")
    assert json.loads(flag(argv, "--l2-adapter"))["adapter_params"]["engine"] == "nixl"


def test_remote_url_adds_the_checksummed_remote_adapter_after_the_directio_one(tmp_path):
    argv = command("--directio-path", str(tmp_path), "--remote-url", "s3://kv/team",
                   "--remote-endpoint-url", "http://s3.internal:8333")
    adapters = [json.loads(argv[i + 1]) for i, arg in enumerate(argv) if arg == "--l2-adapter"]
    assert [a["class_name"] for a in adapters] == ["DirectIOL2Adapter", "RemoteL2Adapter"]
    assert adapters[1]["adapter_params"] == {"url": "s3://kv/team", "endpoint_url": "http://s3.internal:8333"}


@pytest.mark.parametrize("url", ["s3://AKIA:secret@kv", "http://h:1"])
def test_a_bad_remote_url_fails_before_a_server_starts_and_is_not_echoed(url):
    proc = subprocess.run([sys.executable, "-m", "vllm_kvplugin.cli", "server", "--print-command", "--remote-url", url],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "kvplugin.remote.url" in proc.stderr and "secret" not in proc.stderr


def test_bad_tier_values_fail_before_a_server_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vllm_kvplugin.cli", "server", "--print-command",
                           "--directio-path", str(tmp_path), "--directio-max-size-gb", "-1"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "max_size_gb" in proc.stderr


def test_an_l1_larger_than_shared_memory_is_refused_naming_the_fix():
    with pytest.raises(SystemExit, match="--no-shm"):
        check_shm_space(1e6)
    check_shm_space(0.001)
