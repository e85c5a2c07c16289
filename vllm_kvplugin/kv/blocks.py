# SPDX-License-Identifier: Apache-2.0
"""Whole-block, byte-exact gather and scatter over the paged KV tensors of a vLLM worker.

Runs in the vLLM worker process (called by LMCache's engine on the worker).

vLLM hands a worker's KV cache over as one tensor per attention layer. Since
vLLM 0.30 each is a strided ``[B, H, N, C]`` view into one shared int8 buffer,
in one of six model-wide ``KVCacheLayout`` permutations of ``[L, B, H, N, C]``;
vllm-gaudi instead hands ``(K, V)`` tuples of ``[B, N, H, D]`` tensors per layer
(REFERENCE §4). Either way, dimension 0 of every tensor ("plane") indexes
blocks, and that is all this module assumes. The bytes inside a block are
copied opaquely: vLLM-CPU packs K/V per ISA inside a block and ROCm packs head
slots, so nothing here reads the last dimension as K‖V.

Host-side byte order of ``n`` gathered blocks: when every plane is an equally
spaced view of one storage with one shape and stride (every vLLM ≥0.30 layout,
and the usual vllm-gaudi allocation), the planes are fused into a single
``[P, B, ...]`` view and moved with one ``index_select``/``index_copy_``; the
host buffer is then ``[P, n, block-bytes]``. Otherwise each plane is moved on
its own into consecutive host segments, which is the same byte order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

Plane = torch.Tensor
KVTensors = Sequence["torch.Tensor | Sequence[torch.Tensor | None]"]


def _byte_view(plane: torch.Tensor) -> torch.Tensor:
    """Reinterpret a plane as int8 (int8 rather than uint8: HPU's index ops lack uint8)."""
    if plane.dtype == torch.int8:
        return plane
    if plane.stride(-1) != 1:
        raise ValueError(
            f"KV tensor with innermost stride {plane.stride(-1)} (shape {tuple(plane.shape)}): "
            "the last dimension must be dense to be copied as bytes"
        )
    return plane.view(torch.int8)


def flatten_planes(kv_caches: KVTensors) -> list[torch.Tensor]:
    """One block-indexed tensor per layer (vLLM) or per K and V of a layer (vllm-gaudi)."""
    planes: list[torch.Tensor] = []
    for entry in kv_caches:
        if isinstance(entry, torch.Tensor):
            planes.append(entry)
        else:  # vllm-gaudi TensorTuple (K, V[, k_scales, v_scales]); MLA has V=None
            planes.extend(t for t in list(entry)[:2] if t is not None)
    return planes


def _fuse(planes: list[torch.Tensor]) -> torch.Tensor | None:
    """A single ``[P, B, ...]`` int8 view over all planes, if they are equally spaced in one storage."""
    first = planes[0]
    if any(
        p.shape != first.shape
        or p.stride() != first.stride()
        or p.device != first.device
        or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        for p in planes
    ):
        return None
    offsets = [p.storage_offset() for p in planes]
    spacing = offsets[1] - offsets[0] if len(planes) > 1 else 0
    if any(b - a != spacing for a, b in zip(offsets, offsets[1:])):
        return None
    return torch.as_strided(
        first.new_empty(0).set_(first.untyped_storage()),
        size=(len(planes), *first.shape),
        stride=(spacing, *first.stride()),
        storage_offset=offsets[0],
    )


class PagedKVBlocks:
    """The registered KV tensors of one worker, moved whole blocks at a time.

    Args:
        kv_caches: per-layer KV tensors in the order vLLM registered them; each a
            tensor whose dim 0 is the block index, or a ``(K, V, ...)`` tuple.

    Raises:
        ValueError: if the tensors disagree on the number of blocks or device, or
            a tensor's innermost dimension is not dense.
    """

    def __init__(self, kv_caches: KVTensors):
        planes = [_byte_view(p) for p in flatten_planes(kv_caches)]
        if not planes:
            raise ValueError("no KV tensors were registered")
        self.device = planes[0].device
        self.num_blocks = planes[0].shape[0]
        for p in planes:
            if p.shape[0] != self.num_blocks or p.device != self.device:
                raise ValueError(
                    "KV tensors disagree on block count or device: "
                    f"{tuple(p.shape)} on {p.device} vs {self.num_blocks} blocks on {self.device}"
                )
        self._planes = planes
        self._plane_block_bytes = [p[0].numel() for p in planes]
        self.block_bytes = sum(self._plane_block_bytes)
        self._fused = _fuse(planes)

    @property
    def num_planes(self) -> int:
        return len(self._planes)

    @property
    def fused(self) -> bool:
        """Whether every move is one batched op over all planes."""
        return self._fused is not None

    def gather(self, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Copy blocks ``block_ids`` of every plane into ``out`` (dense, ``len(ids) * block_bytes`` bytes)."""
        for src, dst in self._pairs(block_ids, out):
            torch.index_select(src, self._block_dim(src), block_ids, out=dst)

    def scatter(self, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` (as produced by :meth:`gather`) into blocks ``block_ids``; other blocks are untouched."""
        for dst, data in self._pairs(block_ids, src):
            dst.index_copy_(self._block_dim(dst), block_ids, data)

    def _block_dim(self, t: torch.Tensor) -> int:
        return 1 if t is self._fused else 0

    def _pairs(self, block_ids: torch.Tensor, host: torch.Tensor) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """(device tensor, host view shaped like its selected blocks) for each batched op."""
        n = block_ids.numel()
        if not host.is_contiguous():
            raise ValueError("host buffer must be contiguous")  # a reshape would copy, and lose the data
        flat = _byte_view(host).view(-1)
        if flat.numel() != n * self.block_bytes:
            raise ValueError(
                f"host buffer holds {flat.numel()} bytes, {n} blocks need {n * self.block_bytes}"
            )
        if self._fused is not None:
            inner = self._fused.shape[2:]
            yield self._fused, flat.view(self.num_planes, n, *inner)
            return
        offset = 0
        for plane, nbytes in zip(self._planes, self._plane_block_bytes):
            yield plane, flat[offset : offset + n * nbytes].view(n, *plane.shape[1:])
            offset += n * nbytes
