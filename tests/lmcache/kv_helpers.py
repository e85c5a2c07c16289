# SPDX-License-Identifier: Apache-2.0
"""vLLM-CPU-like paged KV for LMCache-level tests: LBHNC views ``[B, H, N, 2*D]`` bf16 over one buffer."""

import time

import torch


def paged_kv(layers: int, blocks: int, heads: int, block: int, head: int, seed: int | None = None) -> list[torch.Tensor]:
    """Per-layer views; random bytes for a seed, zeros without one."""
    numel = layers * blocks * heads * block * 2 * head
    if seed is None:
        buf = torch.zeros(numel, dtype=torch.bfloat16)
    else:
        g = torch.Generator().manual_seed(seed)
        buf = torch.randint(-128, 128, (2 * numel,), dtype=torch.int8, generator=g).view(torch.bfloat16)
    return list(buf.view(layers, blocks, heads, block, 2 * head).unbind(0))


def slot_mapping(block_table: list[int], num_tokens: int, block: int) -> torch.Tensor:
    """vLLM's per-token slots for a request whose blocks are ``block_table``."""
    pos = torch.arange(num_tokens)
    return torch.tensor(block_table)[pos // block] * block + pos % block


def wait_for_lookup(engine, tokens, expected: int, timeout: float = 20.0) -> int:
    """Hit tokens once ``expected`` are visible (asynchronous tiers), or what is visible at ``timeout``."""
    deadline = time.monotonic() + timeout
    while (hit := engine.lookup(tokens)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return hit
