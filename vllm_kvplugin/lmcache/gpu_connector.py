# SPDX-License-Identifier: Apache-2.0
"""LMCache ``GPUConnectorInterface`` backed by the portable KV mover.

Runs in the vLLM worker process; LMCache's engine calls it on store (paged
blocks -> host ``MemoryObj``) and retrieve (host ``MemoryObj`` -> paged blocks).

LMCache allocates each chunk's host object as ``[2, L, n, H*D]`` (``[1, L, n, D]``
for MLA) in the KV dtype. That is exactly the size of the ``n / block_size``
whole vLLM blocks that hold the chunk, so the object carries those blocks' raw
bytes (see :mod:`vllm_kvplugin.kv.blocks` for their order). LMCache itself never
interprets the bytes of a chunk on this path (no blending, no layer-wise
transfer: both are refused at startup), and the cache key carries a layout
fingerprint, so no engine reads them with a different layout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from lmcache.logging import init_logger
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.metadata import LMCacheMetadata

from vllm_kvplugin.devices import device_ops
from vllm_kvplugin.kv import PagedKVBlocks
from vllm_kvplugin.kv.blocks import flatten_planes

logger = init_logger(__name__)


def _memory_of(kv_caches) -> tuple:
    """Where a set of KV tensors keeps its bytes, and how it views them.

    Equal only for views of the same memory: the registered blocks hold their
    tensors' storage, so no other tensor can be allocated at those addresses.
    (``id()`` is no such key: a freed list's ids are reused by the next one, and
    a load would then fill the old tensors instead of the new ones.)
    """
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t in flatten_planes(kv_caches))


def _k_only(kv_caches, block_size: int) -> bool:
    """Whether each layer came as one vllm-gaudi ``[NB, BS, NH, HS]`` tensor (K without its V)."""
    return all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == block_size for t in kv_caches)


def _device_type(kv_caches) -> str:
    first = kv_caches[0]
    return (first if isinstance(first, torch.Tensor) else first[0]).device.type


@dataclass
class TransferTotals:
    """What the mover has moved since it was built; only ever added to.

    Read by the worker's stats sampler (:mod:`vllm_kvplugin.metrics`), which
    reports increments. Seconds are wall time inside a batched call, which
    already ends with the device synchronised (no extra sync for counting).
    Stores may run on the save thread while loads run on the forward thread.
    """

    loaded_tokens: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    stored_tokens: int = 0
    stored_bytes: int = 0
    store_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def record(self, to_host: bool, tokens: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            if to_host:
                self.stored_tokens += tokens
                self.stored_bytes += nbytes
                self.store_seconds += seconds
            else:
                self.loaded_tokens += tokens
                self.loaded_bytes += nbytes
                self.load_seconds += seconds


class PortableGPUConnector(GPUConnectorInterface):
    """Moves LMCache chunks as whole vLLM blocks, on any torch device.

    Args:
        metadata: LMCache's engine metadata (its ``kv_shape`` gives the host
            object shape).
        block_size: vLLM's tokens per block; every chunk LMCache moves starts
            on a block boundary and spans whole blocks (``chunk_size`` is a
            multiple of it, checked at startup).
        huge_pages: back the KV caches with 2 MiB pages when they are registered
            (``kvplugin.huge_pages``; :meth:`DeviceOps.prepare_kv_memory`).
    """

    def __init__(self, metadata: LMCacheMetadata, block_size: int, huge_pages: bool = False):
        num_layers, kv_size, _, num_heads, head_size = metadata.kv_shape
        self._shape_prefix = (kv_size, num_layers)
        self._hidden = num_heads * head_size
        self._use_mla = metadata.use_mla
        self._dtype = metadata.kv_dtype
        self.block_size = block_size
        self._huge_pages = huge_pages
        self.blocks: PagedKVBlocks | None = None
        self._registered: tuple = ()  # where the registered KV tensors' bytes are (_memory_of)
        self._staging: dict[bool, torch.Tensor] = {}  # per direction: a store and a load may overlap
        self.totals = TransferTotals()

    # -- LMCache contract ------------------------------------------------

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([*self._shape_prefix, num_tokens, self._hidden])

    def from_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs) -> None:
        self.batched_from_gpu([memory_obj], [start], [end], **kwargs)

    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs) -> None:
        self.batched_to_gpu([memory_obj], [start], [end], **kwargs)

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs) -> None:
        """Store path: gather each chunk's blocks into its host object."""
        self._transfer(memory_objs, starts, ends, kwargs, to_host=True)
        if self._use_mla:
            for obj in memory_objs:
                obj.metadata.fmt = MemoryFormat.KV_MLA_FMT

    def batched_to_gpu(self, memory_objs=None, starts=None, ends=None, **kwargs) -> None:
        """Retrieve path: scatter each host object into its chunk's blocks."""
        self._transfer(memory_objs, starts, ends, kwargs, to_host=False)

    def _transfer(self, memory_objs, starts, ends, kwargs, to_host: bool) -> None:
        began = time.perf_counter()
        tokens = nbytes = 0
        blocks = self._blocks(kwargs)
        slot_mapping = kwargs["slot_mapping"]
        ops = device_ops(blocks.device.type)
        staged = False
        for obj, start, end in zip(memory_objs, starts, ends, strict=True):
            ids = self._block_ids(slot_mapping, start, end)
            host = obj.tensor
            tokens += end - start
            nbytes += host.numel() * host.element_size()
            if not ops.needs_staging(blocks.device, host.device):  # CPU: one copy, no staging
                (blocks.gather if to_host else blocks.scatter)(ids, host)
                continue
            # Accelerators: whole blocks go through one reused device buffer. Chunks
            # are queued in stream order, so reusing it between chunks is safe.
            staged = True
            staging = self._staging_for(blocks, host, to_host)
            host_bytes = host.view(-1).view(torch.int8)
            if to_host:
                blocks.gather(ids, staging)
                ops.flush()
                host_bytes.copy_(staging, non_blocking=True)
            else:
                staging.copy_(host_bytes, non_blocking=True)
                blocks.scatter(ids, staging)
                ops.flush()
        if staged:
            # Once per batch, not per chunk: LMCache hands on (store) or frees
            # (retrieve) the host objects as soon as we return.
            ops.synchronize()
        self.totals.record(to_host, int(tokens), nbytes, time.perf_counter() - began)

    # -- helpers -----------------------------------------------------------

    def register(self, kv_caches) -> PagedKVBlocks:
        """Describe the worker's KV tensors (vLLM's ``register_kv_caches`` values)."""
        kv_caches = list(kv_caches)
        ops = device_ops(_device_type(kv_caches))
        self.blocks = PagedKVBlocks(kv_caches, ops.word_dtypes(), ops.max_index_row())
        self._registered = _memory_of(kv_caches)
        expected = self.get_shape(self.block_size).numel() * self._element_size()
        if self.blocks.block_bytes * 2 == expected and _k_only(kv_caches, self.block_size):
            raise ValueError(
                "each layer's KV holds half the bytes LMCache's metadata implies and looks like K alone "
                "([blocks, block_size, heads, head_size]): vllm-gaudi registers only K when dynamic FP8 KV "
                "scales are on (QUANT_CONFIG with VLLM_DYNAMIC_KV_QUANT), and a cache without V and its "
                "scales cannot be restored. Turn dynamic KV quantisation off to use this connector"
            )
        if self.blocks.block_bytes != expected:
            raise ValueError(
                f"vLLM's KV blocks hold {self.blocks.block_bytes} bytes, LMCache's metadata implies "
                f"{expected} ({tuple(self.get_shape(self.block_size))}); the model's KV shape is not "
                "one this connector understands"
            )
        if self._huge_pages:
            ops.prepare_kv_memory(flatten_planes(kv_caches), logger.info)
        return self.blocks

    def _element_size(self) -> int:
        return torch.empty(0, dtype=self._dtype).element_size()

    def _blocks(self, kwargs) -> PagedKVBlocks:
        kv_caches = kwargs["kvcaches"]
        if self.blocks is None or _memory_of(kv_caches) != self._registered:
            return self.register(kv_caches)
        return self.blocks

    def _block_ids(self, slot_mapping: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if start % self.block_size or (end - start) % self.block_size:
            raise ValueError(
                f"chunk [{start}, {end}) is not whole blocks of {self.block_size} tokens"
            )
        return torch.div(slot_mapping[start:end:self.block_size], self.block_size, rounding_mode="floor")

    def _staging_for(self, blocks: PagedKVBlocks, host: torch.Tensor, to_host: bool) -> torch.Tensor:
        """A device buffer of the chunk's size, kept and grown rather than allocated per call.

        One per direction: with async saves a store (save thread) and a load
        (forward thread) can be in flight at once.
        """
        nbytes = host.numel() * host.element_size()
        staging = self._staging.get(to_host)
        if staging is None or staging.numel() < nbytes:
            staging = self._staging[to_host] = torch.empty(nbytes, dtype=torch.int8, device=blocks.device)
        return staging[:nbytes]
