# SPDX-License-Identifier: Apache-2.0
"""P1: the KV mover's store (blocks -> host) and load (host -> blocks) against a plain ``copy_``.

Runs in the benchmarking process, on CPU tensors shaped like a real model's KV.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from vllm_kvplugin.bench.layouts import vllm_style_views
from vllm_kvplugin.devices import device_ops
from vllm_kvplugin.kv import PagedKVBlocks
from vllm_kvplugin.kv.huge_pages import collapse


@dataclass(frozen=True)
class KVShape:
    """Per-rank KV of a model: Llama-3.1-8B by default (32 layers, 8 KV heads, head 128, bf16)."""

    layers: int = 32
    kv_heads: int = 8
    head_size: int = 128
    dtype: torch.dtype = torch.bfloat16

    def block_bytes(self, block_size: int) -> int:
        """Bytes of one block of one layer (K and V)."""
        return self.kv_heads * block_size * 2 * self.head_size * torch.empty(0, dtype=self.dtype).element_size()


@dataclass
class MoverResult:
    layout: str
    block_size: int
    mode: str
    chunk_mib: float
    copy_gbps: float
    store_ratio: float
    load_ratio: float
    store_ratio_hot: float
    load_ratio_hot: float
    layerwise_store: float = float("nan")  # the same blocks moved one layer at a time: time / whole
    layerwise_load: float = float("nan")
    huge_pages: bool = False  # the KV buffer was collapsed to 2 MiB pages, as kvplugin.huge_pages does
    shape_name: str = "8b"


# Per-rank KV of models users serve (HF configs; TP splits KV heads): the mover must hold up on all of them.
MODEL_SHAPES = {
    "Llama-3.1-8B": KVShape(32, 8, 128),
    "Llama-3.2-1B": KVShape(16, 8, 64),
    "Qwen2.5-7B": KVShape(28, 4, 128),
    "Gemma-2-9B": KVShape(42, 8, 256),
    "Llama-3.1-70B, TP=8": KVShape(80, 1, 128),
}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_mover(
    layouts: Iterable[str] = ("LBHNC", "BLHNC", "LHBNC"),  # vLLM-CPU; block-contiguous; ROCm default
    block_sizes: Iterable[int] = (16, 128),
    shape: KVShape = KVShape(),
    chunk_tokens: int = 256,
    cache_gib: float = 1.0,
    rounds: int = 100,
    word_dtypes: tuple[torch.dtype, ...] | None = None,
    huge_pages: bool = False,
    layerwise: bool = True,
    shape_name: str = "8b",
    progress: Callable[[str], None] = lambda msg: None,
) -> list[MoverResult]:
    """Time store and load of one LMCache chunk's blocks, interleaved with a ``copy_`` of as many bytes.

    Each round picks fresh random block ids. A ratio is ``copy_`` time / mover time
    (median over rounds): 1.0 means the mover moves whole blocks as fast as memory copies.

    Two baselines: ``copy_`` of a random contiguous slice of the same KV buffer
    into the same host buffer (the bytes come from memory, as the mover's do), and
    ``copy_`` between two fixed buffers (``*_hot``), which on a machine whose L3
    holds much of a chunk partly runs from cache.

    ``huge_pages``: back the KV buffer with 2 MiB pages first, as the CPU worker
    does with vLLM's cache under ``kvplugin.huge_pages`` (:mod:`vllm_kvplugin.kv.huge_pages`);
    the default is the product's default, 4 KiB pages. ``layerwise``: also time the same blocks moved one layer per call.
    """
    ops = device_ops("cpu")
    words = word_dtypes if word_dtypes is not None else ops.word_dtypes()
    results = []
    for layout in layouts:
        for block_size in block_sizes:
            block = shape.block_bytes(block_size)
            num_blocks = max(4 * chunk_tokens // block_size, int(cache_gib * 2**30) // (shape.layers * block))
            element = torch.empty(0, dtype=shape.dtype).element_size()
            # Random bytes, every page touched (untouched pages read as the shared zero page).
            pattern = torch.randint(-128, 128, (block,), dtype=torch.int8)
            buffer = pattern.repeat(shape.layers * num_blocks)
            collapsed = False
            if huge_pages:
                try:
                    collapsed = collapse(buffer.data_ptr(), buffer.nbytes) > 0
                except OSError as e:
                    progress(f"mover: KV buffer stays on small pages ({e.strerror})")
            views = vllm_style_views(
                buffer.view(shape.dtype), layout, shape.layers, num_blocks, shape.kv_heads, block_size,
                block // (shape.kv_heads * block_size * element),
            )
            blocks = PagedKVBlocks(views, words, ops.max_index_row())
            # Layer-wise transfer moves the same blocks one layer per call (to overlap with compute).
            per_layer = [PagedKVBlocks([v], words, ops.max_index_row()) for v in views]
            n = chunk_tokens // block_size
            host = torch.empty(n * blocks.block_bytes, dtype=torch.int8)
            a, b = torch.empty_like(host), torch.empty_like(host)
            layer_parts = host.view(shape.layers, -1)
            rows = {"copy": [], "store": [], "load": [], "store_hot": [], "load_hot": [],
                    "layerwise_store": [], "layerwise_load": []}
            slices = buffer.numel() // host.numel()
            for r in range(rounds + 1):
                ids = torch.randperm(num_blocks)[:n]
                offset = int(torch.randint(slices, ())) * host.numel()
                cold = buffer[offset : offset + host.numel()]
                t_cold = _seconds(lambda: a.copy_(cold))
                t_hot = _seconds(lambda: a.copy_(b))
                t_store = _seconds(lambda: blocks.gather(ids, host))
                t_load = _seconds(lambda: blocks.scatter(ids, host))
                if layerwise:
                    t_layers_store = _seconds(lambda: [b.gather(ids, part) for b, part in zip(per_layer, layer_parts)])
                    t_layers_load = _seconds(lambda: [b.scatter(ids, part) for b, part in zip(per_layer, layer_parts)])
                if r:  # round 0 warms caches and allocators
                    rows["copy"].append(t_cold)
                    rows["store"].append(t_cold / t_store)
                    rows["load"].append(t_cold / t_load)
                    rows["store_hot"].append(t_hot / t_store)
                    rows["load_hot"].append(t_hot / t_load)
                    if layerwise:
                        rows["layerwise_store"].append(t_layers_store / t_store)
                        rows["layerwise_load"].append(t_layers_load / t_load)
            med = {k: statistics.median(v) if v else float("nan") for k, v in rows.items()}
            results.append(
                MoverResult(
                    layout, block_size, blocks.mode, host.numel() / 2**20, host.numel() / med["copy"] / 1e9,
                    med["store"], med["load"], med["store_hot"], med["load_hot"],
                    med["layerwise_store"], med["layerwise_load"], collapsed, shape_name,
                )
            )
            progress(f"mover {shape_name} {layout} block {block_size}: store {results[-1].store_ratio:.0%}, load {results[-1].load_ratio:.0%} of copy_")
    return results


def bench_mover_shapes(
    shapes: dict[str, KVShape] = MODEL_SHAPES,
    layouts: Iterable[str] = ("LBHNC", "BLHNC"),  # the row layouts; vLLM-CPU's is LBHNC
    block_sizes: Iterable[int] = (16, 32, 64, 128),
    rounds: int = 40,
    cache_gib: float = 1.0,
    progress: Callable[[str], None] = lambda msg: None,
) -> list[MoverResult]:
    """:func:`bench_mover` over the KV shapes of :data:`MODEL_SHAPES` and vLLM's block sizes."""
    return [
        r for name, shape in shapes.items()
        for r in bench_mover(layouts, block_sizes, shape, rounds=rounds, cache_gib=cache_gib, layerwise=False,
                              shape_name=name, progress=progress)
    ]
