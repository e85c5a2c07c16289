# SPDX-License-Identifier: Apache-2.0
"""The KV mover core: torch only, no vLLM or LMCache imports (tested with torch alone)."""

from vllm_kvplugin.kv.blocks import PagedKVBlocks

__all__ = ["PagedKVBlocks"]
