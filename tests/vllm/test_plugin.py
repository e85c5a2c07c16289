# SPDX-License-Identifier: Apache-2.0
"""vLLM contract: discovery from the installed distribution, registration, connector creation by vLLM's factory."""

import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch  # noqa: F401  - must precede lmcache (its native lib dlopens libc10)

from vllm_kvplugin import plugin


def test_entry_points_are_found_in_the_installed_distribution():
    dist = importlib.metadata.distribution("vllm-kvplugin")
    eps = {(ep.group, ep.name): ep.value for ep in dist.entry_points}
    assert eps[("vllm.general_plugins", "kvplugin")] == "vllm_kvplugin.plugin:register_connectors"
    assert eps[("vllm.platform_plugins", "kvplugin")] == "vllm_kvplugin.plugin:prepare_process"
    found = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "kvplugin" in found.names


def test_platform_entry_claims_no_platform_and_vllm_still_resolves_cpu():
    assert plugin.prepare_process() is None
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()


def test_load_general_plugins_registers_both_connector_names():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    plugin.register_connectors()  # a second call, as spawned processes do: must not raise
    from vllm_kvplugin.connector import LMCacheHPUConnector, LMCachePortableConnector

    for name, cls in [("LMCachePortableConnector", LMCachePortableConnector), ("LMCacheHPUConnector", LMCacheHPUConnector)]:
        ktc = KVTransferConfig(kv_connector=name, kv_role="kv_both")
        assert KVConnectorFactory.get_connector_class(ktc) is cls


def test_cuda_routes_the_portable_name_to_lmcache_native_kernels():
    cuda = plugin.connector_targets(platform_is_cuda=True)
    assert cuda["LMCachePortableConnector"] == (
        "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector",
        "LMCacheConnectorV1",
    )
    assert cuda["LMCacheHPUConnector"] == ("vllm_kvplugin.connector", "LMCacheHPUConnector")
    other = plugin.connector_targets(platform_is_cuda=False)
    assert other["LMCachePortableConnector"] == ("vllm_kvplugin.connector", "LMCachePortableConnector")


@pytest.mark.parametrize(
    "env, config_text, expected_hash",
    [
        ({}, None, "sha256_cbor"),
        ({"PYTHONHASHSEED": "0"}, None, None),  # the user chose the builtin hash knowingly
        ({"LMCACHE_PRE_CACHING_HASH_ALGORITHM": "xxhash"}, None, None),
        ({}, "chunk_size: 256\npre_caching_hash_algorithm: builtin\n", None),
        ({}, "chunk_size: 256\n", "sha256_cbor"),
    ],
)
def test_environment_defaults_never_override_the_user(tmp_path, env, config_text, expected_hash):
    env = dict(env)
    if config_text is not None:
        path = tmp_path / "lmcache.yaml"
        path.write_text(config_text)
        env["LMCACHE_CONFIG_FILE"] = str(path)
    defaults = plugin._environment_defaults(env)
    assert defaults.get("LMCACHE_PRE_CACHING_HASH_ALGORITHM") == expected_hash
    assert defaults.get("LMCACHE_TRACK_USAGE") == "false"
    assert "LMCACHE_DEVICE_BACKEND" not in defaults  # no Gaudi bridge on this host
    assert not plugin._environment_defaults({**env, **defaults, "LMCACHE_TRACK_USAGE": "true"})


_CHUNK_HASHES = """
import torch  # noqa: F401  - must precede lmcache (its native lib dlopens libc10)
from vllm_kvplugin.plugin import prepare_process
prepare_process()
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.token_database import ChunkedTokenDatabase
db = ChunkedTokenDatabase(LMCacheEngineConfig.from_env(), None)
print([h for _, _, h in db.process_tokens(tokens=torch.arange(512), make_key=False)])
"""


def _chunk_hashes_in_a_fresh_process(**env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONHASHSEED", "LMCACHE_"))}
    out = subprocess.run(
        [sys.executable, "-c", _CHUNK_HASHES], env={**base, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def test_chunk_keys_agree_across_processes_only_with_the_hook_default():
    """Scheduler and worker are separate processes; LMCache's default hash differs between them."""
    with_hook = [_chunk_hashes_in_a_fresh_process() for _ in range(2)]
    assert with_hook[0] == with_hook[1]
    builtin = [_chunk_hashes_in_a_fresh_process(LMCACHE_PRE_CACHING_HASH_ALGORITHM="builtin") for _ in range(2)]
    assert builtin[0] != builtin[1]  # what users get without the hook (LMCache #1139)
