# SPDX-License-Identifier: Apache-2.0
"""Load the ``examples/`` configs with their placeholders replaced (tests run in the pytest process).

Shared by the validation tests and the engine tests that start examples for
real: ``load_example("cpu-tier.json", {PLACEHOLDER_LOCAL: str(tmp_path)})``.
"""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PLACEHOLDER_LOCAL = "/var/cache/kvplugin"
PLACEHOLDER_SHARED = "/mnt/kvshare/kvplugin"
PLACEHOLDER_REDIS = "redis://redis.kvcache.svc:6379"
PLACEHOLDER_S3_ENDPOINT = "http://s3.kvcache.svc:8333"
PLACEHOLDERS = (PLACEHOLDER_LOCAL, PLACEHOLDER_SHARED, PLACEHOLDER_REDIS, PLACEHOLDER_S3_ENDPOINT)


def example_names() -> list[str]:
    """Every ``--kv-transfer-config`` example (``*.json``)."""
    return sorted(p.name for p in EXAMPLES.glob("*.json"))


def example_text(name: str, substitutions: dict[str, str] | None = None) -> str:
    """The file's text with each placeholder in ``substitutions`` replaced."""
    text = (EXAMPLES / name).read_text()
    for placeholder, value in (substitutions or {}).items():
        text = text.replace(placeholder, value)
    return text


def load_example(name: str, substitutions: dict[str, str] | None = None) -> dict:
    """The example's ``--kv-transfer-config`` as a dict (what ``vllm serve`` parses)."""
    return json.loads(example_text(name, substitutions))


def lmcache_yaml_for(name: str) -> str | None:
    """The LMCache YAML paired with an example (``redis-shared.json`` -> ``redis-shared.lmcache.yaml``)."""
    path = EXAMPLES / name.replace(".json", ".lmcache.yaml")
    return path.name if path.exists() else None
