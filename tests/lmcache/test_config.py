# SPDX-License-Identifier: Apache-2.0
"""Startup validation of the connector's configuration (what the engine core and workers run first)."""

from types import SimpleNamespace

import pytest

from vllm_kvplugin.lmcache.settings import check_supported, prepare_config, save_mode


def vllm_config(extra, block_size=32):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
        cache_config=SimpleNamespace(block_size=block_size),
    )


def test_a_misspelt_plugin_key_names_itself_and_the_valid_ones():
    with pytest.raises(ValueError) as err:
        prepare_config(vllm_config({"kvplugin.directio.pth": "/cache"}))
    message = str(err.value)
    assert "kvplugin.directio.pth" in message and "kvplugin.directio.path" in message


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"chunk_size": 100}, "not a multiple of vLLM's block_size=32"),
        ({"use_layerwise": True}, "use_layerwise"),
        ({"enable_blending": True}, "CacheBlend"),
        ({"local_disk": "file:///nvme/lmcache/", "max_local_disk_size": 5.0},
         "keeps no checksum .* use the checksummed, persistent direct-I/O tier instead: kvplugin.directio.path"),
        ({"remote_url": "redis://u:s3cret@h:6379"}, "^(?!.*s3cret).*without a checksum .* kvplugin.remote.url"),
    ],
)
def test_settings_that_would_move_partial_blocks_are_refused(settings, problem):
    config = SimpleNamespace(chunk_size=256, save_unfull_chunk=False, use_layerwise=False, enable_blending=False,
                             local_disk=None, max_local_disk_size=0.0, remote_url=None)
    for key, value in settings.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=problem):
        check_supported(config, 32)


def connector_config(device: str, role: str = "kv_both", **extra):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_role=role, kv_connector_extra_config=extra),
        device_config=SimpleNamespace(device=device),
    )


@pytest.mark.parametrize(
    "device, role, extra, mode",
    [
        ("cpu", "kv_both", {}, "sync"),  # measured: no gain on CPU (BENCHMARKS.md, P4)
        ("cuda", "kv_both", {}, "async"),
        ("hpu", "kv_both", {}, "sync"),
        ("cuda", "kv_producer", {}, "async"),
        ("cpu", "kv_both", {"kvplugin.save_mode": "async"}, "async"),
        ("cuda", "kv_both", {"kvplugin.save_mode": "sync"}, "sync"),
        ("cuda", "kv_consumer", {"kvplugin.save_mode": "async"}, "sync"),  # a consumer saves nothing
    ],
)
def test_save_mode_follows_device_role_and_setting(device, role, extra, mode):
    assert save_mode(connector_config(device, role, **extra)) == mode
