# SPDX-License-Identifier: Apache-2.0
"""vLLM's own KVConnectorFactory creates our connector for both roles, from a real VllmConfig."""

import json
import os
import subprocess
import sys
from pathlib import Path


def probe(model: str, workdir: Path, **env) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("factory_probe.py")), model, str(workdir)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_factory_creates_the_portable_connector_for_scheduler_and_worker(tiny_model, tmp_path):
    result = probe(tiny_model, tmp_path)
    assert result["scheduler"] == result["worker"] == "LMCachePortableConnector"
    assert (result["scheduler_role"], result["worker_role"]) == ("SCHEDULER", "WORKER")
    assert result["mover"] == "PortableGPUConnector"
    assert result["fused"] and result["healthy"]
    # The layout fingerprint is part of the model name, hence of every cache key.
    assert "@kvplugin1/cpu-" in result["model_name"] and result["model_name"].endswith("/bs32")


def test_a_configured_storage_plugin_that_fails_to_build_stops_startup(tiny_model, tmp_path):
    """LMCache would log the failure and run without the tier; the connector refuses instead."""
    config = tmp_path / "lmcache.yaml"
    config.write_text(
        "storage_plugins: [kvplugin_directio]\nextra_config:\n"
        "  storage_plugin.kvplugin_directio.module_path: vllm_kvplugin.lmcache.directio_backend\n"
        "  storage_plugin.kvplugin_directio.class_name: DirectIOBackend\n"
        f"  kvplugin.directio.path: {tmp_path / 'tier'}\n  kvplugin.directio.max_size_gb: lots\n"
    )
    result = probe(tiny_model, tmp_path, LMCACHE_CONFIG_FILE=str(config))
    assert result == {"error": "LMCache storage plugin(s) ['kvplugin_directio'] failed to start; "
                               "see the LMCache error above. Refusing to start without the configured tier."}


def test_lmcache_local_disk_tier_is_refused_pointing_to_the_checksummed_tier(tiny_model, tmp_path):
    """LMCache 0.5.6's LocalDiskBackend serves truncated or bit-flipped files as hits (wrong tokens)."""
    result = probe(tiny_model, tmp_path, LMCACHE_LOCAL_DISK=f"file://{tmp_path}/disk/", LMCACHE_MAX_LOCAL_DISK_SIZE="1")
    assert "local_disk=" in result["error"] and "keeps no checksum" in result["error"]
    assert "kvplugin.directio.path" in result["error"]
