# SPDX-License-Identifier: Apache-2.0
"""The ``examples/`` configs pass the validation vLLM and the connector run at startup.

Each example goes through vLLM's ``KVTransferConfig`` (as ``--kv-transfer-config``
does) and the connector's :func:`check_extra_config`, at every block size vLLM
picks by default (CUDA/ROCm 16, the CPU tests 32, CPU and Gaudi 128); the
Kubernetes manifests in ``deploy/k8s`` serve an example verbatim.
"""

import json
import re

import pytest
import yaml
from example_configs import (
    EXAMPLES,
    PLACEHOLDER_LOCAL,
    PLACEHOLDER_REDIS,
    PLACEHOLDER_S3_ENDPOINT,
    PLACEHOLDER_SHARED,
    example_names,
    example_text,
    lmcache_yaml_for,
    load_example,
)
from vllm.config import KVTransferConfig

from vllm_kvplugin.lmcache.directio_backend import PATH_KEY, PLUGIN_NAME
from vllm_kvplugin.lmcache.remote_tier import PLUGIN_NAME as REMOTE_PLUGIN
from vllm_kvplugin.lmcache.settings import check_extra_config
from vllm_kvplugin.mp.settings import check_mp_config, is_mp_config
from vllm_kvplugin.storage.settings import REMOTE_ENDPOINT_KEY, REMOTE_URL_KEY, remote_settings

REQUIRED = {"cpu-tier.json", "cpu-nvme-directio.json", "shared-directory.json", "redis-shared.json",
            "s3-shared.json", "producer.json", "consumer.json", "mp-server.json"}
BLOCK_SIZES = (16, 32, 128)


@pytest.fixture
def substitutions(tmp_path):
    return {PLACEHOLDER_LOCAL: str(tmp_path / "nvme"), PLACEHOLDER_SHARED: str(tmp_path / "shared"),
            PLACEHOLDER_REDIS: "redis://127.0.0.1:6399", PLACEHOLDER_S3_ENDPOINT: "http://127.0.0.1:8399"}


def test_every_required_example_exists_and_uses_only_placeholder_paths():
    assert REQUIRED <= set(example_names())
    for path in EXAMPLES.iterdir():
        text = path.read_text()
        for machine_path in ("/home/", "/work/", "/tmp/", "/root/"):
            assert machine_path not in text, f"{path.name} names a machine path ({machine_path})"


@pytest.mark.parametrize("name", example_names())
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_example_passes_vllm_and_connector_startup_validation(name, block_size, substitutions):
    data = load_example(name, substitutions)
    ktc = KVTransferConfig(**data)
    assert ktc.kv_connector in ("LMCachePortableConnector", "LMCacheHPUConnector")
    extra = ktc.kv_connector_extra_config
    if is_mp_config(extra):  # LMCache MP mode: the server holds the settings (tests/e2e/test_mp_mode.py runs it)
        check_mp_config(extra)
        assert set(extra) <= {"lmcache.mp.host", "lmcache.mp.port"}
        return
    config = check_extra_config(extra, block_size)
    assert config.chunk_size == extra["lmcache.chunk_size"]
    if PATH_KEY in extra:  # the direct-I/O tier is wired into LMCache, at the substituted path
        assert PLUGIN_NAME in config.storage_plugins
        assert config.extra_config[PATH_KEY] in substitutions.values()
    if REMOTE_URL_KEY in extra:  # the checksummed remote tier, never LMCache's unchecked remote_url
        assert REMOTE_PLUGIN in config.storage_plugins and config.remote_url is None
        if extra[REMOTE_URL_KEY].startswith("s3://"):  # a bucket; the endpoint at the substituted address
            assert config.extra_config[REMOTE_ENDPOINT_KEY] == substitutions[PLACEHOLDER_S3_ENDPOINT]
        else:
            assert config.extra_config[REMOTE_URL_KEY] == substitutions[PLACEHOLDER_REDIS]


@pytest.mark.parametrize("name", [n for n in example_names() if lmcache_yaml_for(n)])
def test_paired_lmcache_yaml_gives_the_same_lmcache_settings(name, substitutions, tmp_path, monkeypatch):
    yaml_path = tmp_path / "lmcache.yaml"
    yaml_path.write_text(example_text(lmcache_yaml_for(name), substitutions))
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(yaml_path))
    from_yaml = check_extra_config({}, 128)
    monkeypatch.delenv("LMCACHE_CONFIG_FILE")
    from_json = check_extra_config(load_example(name, substitutions)["kv_connector_extra_config"], 128)
    for key in ("chunk_size", "max_local_cpu_size", "pre_caching_hash_algorithm", "remote_url", "storage_plugins"):
        assert getattr(from_yaml, key) == getattr(from_json, key), key
    for key, value in (from_yaml.extra_config or {}).items():  # the YAML leaves defaults out
        assert from_json.extra_config[key] == value, key
    if REMOTE_URL_KEY in from_json.extra_config:
        assert remote_settings(from_yaml.extra_config) == remote_settings(from_json.extra_config)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"lmcache.chunk_size": 100}, "not a multiple of vLLM's block_size=32"),
        ({"lmcache.use_layerwise": True}, "use_layerwise"),
        ({"kvplugin.directio.pth": "/x"}, "unknown kv_connector_extra_config key"),
    ],
)
def test_a_broken_variant_of_an_example_is_refused(change, problem, substitutions):
    data = load_example("cpu-nvme-directio.json", substitutions)
    data["kv_connector_extra_config"].update(change)
    with pytest.raises(ValueError, match=problem):
        check_extra_config(KVTransferConfig(**data).kv_connector_extra_config, 32)


def test_an_example_without_kv_role_is_refused_by_vllm(substitutions):
    data = load_example("cpu-tier.json", substitutions)
    del data["kv_role"]
    with pytest.raises(ValueError, match="kv_role"):
        KVTransferConfig(**data)


@pytest.mark.parametrize("manifest, device", [("gaudi3.yaml", "habana.ai/gaudi"), ("mi300x.yaml", "amd.com/gpu")])
def test_k8s_manifest_serves_an_example_config_verbatim_with_its_tier_mounted(manifest, device):
    docs = list(yaml.safe_load_all((EXAMPLES.parent / "deploy" / "k8s" / manifest).read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"ConfigMap", "Deployment", "Service"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    for container in pod["initContainers"] + pod["containers"]:
        command = " ".join(container["command"] + container["args"])
        names = re.findall(r"/etc/kvplugin/([\w.-]+\.json)", command)
        assert names and names[0] in example_names(), command
        assert json.loads(kinds["ConfigMap"]["data"][names[0]]) == load_example(names[0])
        assert container["resources"]["limits"][device] == 1
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert load_example(names[0])["kv_connector_extra_config"][PATH_KEY] in mounts
    assert "vllm-kvplugin doctor" in " ".join(pod["initContainers"][0]["args"])
    assert kinds["Service"]["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
