# SPDX-License-Identifier: Apache-2.0
"""vLLM's own KVConnectorFactory creates our connector for both roles, from a real VllmConfig."""

import json
import subprocess
import sys
from pathlib import Path


def test_factory_creates_the_portable_connector_for_scheduler_and_worker(tiny_model, tmp_path):
    probe = Path(__file__).with_name("factory_probe.py")
    out = subprocess.run(
        [sys.executable, str(probe), tiny_model, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["scheduler"] == result["worker"] == "LMCachePortableConnector"
    assert (result["scheduler_role"], result["worker_role"]) == ("SCHEDULER", "WORKER")
    assert result["mover"] == "PortableGPUConnector"
    assert result["fused"] and result["healthy"]
    # The layout fingerprint is part of the model name, hence of every cache key.
    assert "@kvplugin1/cpu-" in result["model_name"] and result["model_name"].endswith("/bs32")
