# SPDX-License-Identifier: Apache-2.0
"""vLLM-style KV tensors without vLLM: per-layer views of one buffer, as vLLM ≥0.30 builds them.

Used by the mover benchmark and the tests (REFERENCE §4: ``create_kv_cache_views``).
"""

from __future__ import annotations

import torch

# vLLM's KVCacheLayout names: the physical order of the logical dims [L, B, H, N, C].
LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


def vllm_style_views(buffer: torch.Tensor, layout: str, L: int, B: int, H: int, N: int, C: int) -> list[torch.Tensor]:
    """``L`` views ``[B, H, N, C]`` of ``buffer`` (dense, ``L*B*H*N*C`` elements) in ``layout``."""
    sizes = dict(zip("LBHNC", (L, B, H, N, C)))
    strides, acc = {}, 1
    for dim in reversed(layout):
        strides[dim] = acc
        acc *= sizes[dim]
    return [
        torch.as_strided(
            buffer, (B, H, N, C), (strides["B"], strides["H"], strides["N"], strides["C"]),
            storage_offset=layer * strides["L"],
        )
        for layer in range(L)
    ]
