# SPDX-License-Identifier: Apache-2.0
"""Doctor check: does the installed vllm-gaudi drive connectors the way our tests replay it?

Runs in the user's shell process. vllm-gaudi's model runner calls KV
connectors differently from vLLM's (REFERENCE §15); the connector is tested
against a replay of its runner at one commit (``tests/vllm/runner_harness.py``,
vllm-gaudi 091bbadd). vllm-gaudi needs Habana's stack to import, so its runner
is recognised from its source text, never imported: each behaviour the replay
depends on is one marker the file must contain.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

PINNED_COMMIT = "091bbadd"
RUNNER = Path("v1", "worker", "hpu_model_runner.py")

# behaviour the replay follows -> a pattern of the runner source that shows it
MARKERS = {
    "forward context gated on LMCache's metadata type":
        r"isinstance\(\s*scheduler_output\.kv_connector_metadata,\s*LMCacheConnectorMetadata\)",
    "bind_connector_metadata then start_load_kv before the forward":
        r"bind_connector_metadata\([^)]*\)\s*(#.*\s*)*.*start_load_kv\(get_forward_context\(\)\)",
    "get_finished called directly": r"\.get_finished\(scheduler_output\.finished_req_ids\)",
    "KV registered as TensorTuple((K, V)) views": r"TensorTuple\(tuple\(kv_cache_per_layer\)\)",
    "pad block trimmed from the registered views": r"expected_num_blocks \+ 1",
}
# A runner that reports load errors gives vLLM's scheduler what it needs to recompute.
REPORTS_LOAD_ERRORS = r"invalid_block_ids\s*="


def runner_source() -> tuple[str, str] | None:
    """(version, runner source) of the installed vllm-gaudi, or None if it is not installed."""
    spec = importlib.util.find_spec("vllm_gaudi")
    if spec is None or not spec.submodule_search_locations:
        return None
    version = "unknown version"
    for dist in ("vllm-gaudi", "vllm_gaudi"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version = importlib.metadata.version(dist)
            break
    path = Path(next(iter(spec.submodule_search_locations)), RUNNER)
    return version, path.read_text() if path.is_file() else ""


def check_gaudi_runner(found, installed: tuple[str, str] | None = None) -> None:
    """One finding: vllm-gaudi absent, matching the replayed runner, or differing (which markers)."""
    installed = installed if installed is not None else runner_source()
    if installed is None:
        found.add("vllm-gaudi", "ok", "not installed (vLLM's own model runner drives the connector)")
        return
    version, source = installed
    missing = [what for what, pattern in MARKERS.items() if not re.search(pattern, source)]
    errors = "reports load errors" if re.search(REPORTS_LOAD_ERRORS, source) else "drops load errors"
    if not source:
        found.add("vllm-gaudi", "warn", f"vllm-gaudi {version} installed, but {RUNNER} was not found: its runner "
                  f"cannot be compared with the replayed one ({PINNED_COMMIT})")
    elif missing:
        found.add("vllm-gaudi", "warn", f"vllm-gaudi {version}: its runner differs from the replayed {PINNED_COMMIT} "
                  f"({'; '.join(missing)} not found; {errors}); the connector loads whatever forward context it gets "
                  "and verifies chunks at lookup, but this runner is untested")
    else:
        found.add("vllm-gaudi", "ok", f"vllm-gaudi {version}: its runner matches the replayed {PINNED_COMMIT} "
                  f"({len(MARKERS)} behaviours recognised in {RUNNER}; {errors}, so chunks are verified at lookup)")
