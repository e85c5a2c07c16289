# SPDX-License-Identifier: Apache-2.0
"""Whole-block, byte-exact gather and scatter over the paged KV tensors of a vLLM worker.

Runs in the vLLM worker process (called by LMCache's engine on the worker).

vLLM hands a worker's KV cache over as one tensor per attention layer. Since
vLLM 0.30 each is a strided ``[B, H, N, C]`` view into one shared int8 buffer,
in one of six model-wide ``KVCacheLayout`` permutations of ``[L, B, H, N, C]``;
vllm-gaudi instead hands ``(K, V)`` tuples of ``[B, N, H, D]`` tensors per layer
(REFERENCE §4). Either way, dimension 0 of every tensor ("plane") indexes
blocks, and that is all this module assumes. The bytes inside a block are
copied opaquely, in the order they have in memory: vLLM-CPU packs K/V per ISA
inside a block and ROCm packs head slots, so nothing here reads the last
dimension as K‖V.

How a move is done (:class:`PagedKVBlocks` picks the first that applies):

* **rows** — every plane is an equally spaced view of one storage and each
  block of a plane is one dense run of bytes. The whole cache is then a 2-D
  table of rows, and a move is one ``index_select``/``index_copy_`` of whole
  rows: plane-major rows ``[P*B, block]`` for ``LB**`` layouts (host order
  ``[P, n, block]``), block-major rows ``[B, P*block]`` for ``BL**`` layouts,
  where a block is contiguous across all layers (host order ``[n, P, block]``).
* **strided rows** — equally spaced planes whose blocks are not dense but made of
  equal dense runs (``LHBNC``, ``BHLNC``: one run per head) spaced by whole runs:
  the cache is then a table of runs, and a move is one ``index_select``/``index_copy_``
  of the runs ``[P, n, heads...]`` of the blocks; host order ``[P, n, ...]``.
* **strided** — other equally spaced planes whose blocks are not dense: one
  batched ``aten::index`` over a ``[P, B, ...]`` view; host order ``[P, n, ...]``.
* **per plane** — anything else (e.g. vllm-gaudi's separately allocated K and
  V): one op per plane into consecutive host segments.

Rows are moved as the widest element type that divides every size, stride and
offset involved (``word_dtypes``, widest first; index kernels cost per element,
so 16-byte words move 64 KiB blocks ~10x faster than bytes), and rows longer
than the device's index kernels handle well (``max_row_words``) are moved as
equal pieces. The host buffer of a move may be any dense tensor of the right
byte size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KVTensors = Sequence["torch.Tensor | Sequence[torch.Tensor | None]"]


def flatten_planes(kv_caches: KVTensors) -> list[torch.Tensor]:
    """One block-indexed tensor per layer (vLLM) or per K and V of a layer (vllm-gaudi)."""
    planes: list[torch.Tensor] = []
    for entry in kv_caches:
        if isinstance(entry, torch.Tensor):
            planes.append(entry)
        else:  # vllm-gaudi TensorTuple (K, V[, k_scales, v_scales]); MLA has V=None
            planes.extend(t for t in list(entry)[:2] if t is not None)
    return planes


def _physical_bytes(plane: torch.Tensor) -> torch.Tensor:
    """The plane as bytes, block dim first and the rest in memory order (outermost first)."""
    if plane.stride(-1) != 1:
        raise ValueError(
            f"KV tensor with innermost stride {plane.stride(-1)} (shape {tuple(plane.shape)}): "
            "the last dimension must be dense to be copied as bytes"
        )
    as_bytes = plane if plane.element_size() == 1 else plane.view(torch.int8)
    # Size-1 dims (any stride) go outermost, so the dense byte dim stays last.
    inner = sorted(
        range(1, as_bytes.dim()),
        key=lambda d: as_bytes.stride(d) if as_bytes.shape[d] > 1 else float("inf"),
        reverse=True,
    )
    return as_bytes.permute(0, *inner).view(torch.int8)


def _is_dense(t: torch.Tensor, first_dim: int) -> bool:
    """Whether dims ``first_dim..`` of ``t`` are one dense run in memory."""
    expected = 1
    for size, stride in zip(reversed(t.shape[first_dim:]), reversed(t.stride()[first_dim:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _word_view(t: torch.Tensor, word: torch.dtype) -> torch.Tensor | None:
    """``t`` (int8, last dim dense) reinterpreted as ``word``, or None if sizes or alignment forbid."""
    w = torch.empty(0, dtype=word).element_size()
    aligned = (
        t.shape[-1] % w == 0
        and t.storage_offset() % w == 0
        and t.data_ptr() % w == 0
        and all(s % w == 0 for s in t.stride()[:-1])
    )
    return t.view(word) if aligned else None


class PagedKVBlocks:
    """The registered KV tensors of one worker, moved whole blocks at a time.

    Args:
        kv_caches: per-layer KV tensors in the order vLLM registered them; each a
            tensor whose dim 0 is the block index, or a ``(K, V, ...)`` tuple.
        word_dtypes: element types a move may use, widest first; the device
            module says which its index kernels support. ``int8`` always works.
        max_row_words: rows longer than this many words are cut into equal
            pieces for the index kernels (the device module's ``max_index_row``).

    Raises:
        ValueError: if the tensors disagree on the number of blocks or device, or
            a tensor's innermost dimension is not dense.
    """

    def __init__(
        self,
        kv_caches: KVTensors,
        word_dtypes: Sequence[torch.dtype] = (torch.int8,),
        max_row_words: int | None = None,
    ):
        planes = [_physical_bytes(p) for p in flatten_planes(kv_caches)]
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
        self._word_dtypes = tuple(word_dtypes) + (torch.int8,)
        self._max_row_words = max_row_words
        self._piece_offsets: dict[torch.dtype, torch.Tensor] = {}  # word -> 0..k-1 where its rows are cut
        self._fused = self._fuse(planes)
        self.mode = self._mode()
        self._cache: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}
        # Row offset of each plane in plane-major rows; built once, not per move.
        self._plane_rows = torch.arange(self.num_planes, device=self.device)[:, None] * self.num_blocks
        if self.mode == "strided rows":  # run index of block 0 per [plane, 1, outer dims...], and a block's stride
            self._run, self._run_row_strides = self._run_rows_plan(self._fused)
            sizes = [1 if d == 1 else size for d, size in enumerate(self._fused.shape[: len(self._run_row_strides)])]
            grids = torch.meshgrid(*(torch.arange(size, device=self.device) for size in sizes), indexing="ij")
            self._run_base = sum(grid * stride for grid, stride in zip(grids, self._run_row_strides))

    @property
    def num_planes(self) -> int:
        return len(self._planes)

    @property
    def fused(self) -> bool:
        """Whether every move is one batched op over all planes."""
        return self._fused is not None

    def gather(self, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Copy blocks ``block_ids`` of every plane into ``out`` (dense, ``len(ids) * block_bytes`` bytes)."""
        for src, dim, index, dst in self._moves(block_ids, out):
            if dim == 0:
                torch.index_select(src, dim, index, out=dst)
            else:  # strided planes: CPU index_select over a strided view runs at 1% of copy_, indexing at 74%
                torch.ops.aten.index.Tensor_out(src, [None] * dim + [index], out=dst)

    def scatter(self, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` (as produced by :meth:`gather`) into blocks ``block_ids``; other blocks are untouched."""
        for dst, dim, index, data in self._moves(block_ids, src):
            dst.index_copy_(dim, index, data)

    # -- planning -------------------------------------------------------

    @staticmethod
    def _fuse(planes: list[torch.Tensor]) -> torch.Tensor | None:
        """One ``[P, B, ...]`` view over all planes, if they are equally spaced in one storage."""
        first = planes[0]
        if any(
            p.shape != first.shape
            or p.stride() != first.stride()
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

    def _mode(self) -> str:
        fused = self._fused
        if fused is None:
            return "per-plane"
        num_planes, num_blocks, block = fused.shape[0], fused.shape[1], fused[0, 0].numel()
        plane_stride, block_stride = fused.stride(0), fused.stride(1)
        if _is_dense(fused, 2):
            if block_stride == block and (num_planes == 1 or plane_stride == num_blocks * block_stride):
                return "plane-major rows"
            if block_stride == num_planes * plane_stride and plane_stride == block:
                return "block-major rows"
        return "strided rows" if self._run_rows_plan(fused) is not None else "strided"

    @staticmethod
    def _run_rows_plan(fused: torch.Tensor) -> tuple[int, list[int]] | None:
        """``(run, row strides of the dims before it)`` where ``fused`` is a table of dense runs, else None.

        The run is the longest dense suffix of ``fused`` (``[P, B, d2.., run dims]``);
        it is a row table if every outer stride is a whole number of runs.
        """
        first = next(d for d in range(2, fused.dim() + 1) if _is_dense(fused, d))
        run = fused[(0,) * first].numel()
        strides = fused.stride()[:first]
        if first == fused.dim() or any(s < 0 or s % run for s in strides):
            return None
        return run, [s // run for s in strides]

    def _device_views(self, word: torch.dtype) -> tuple[torch.Tensor, ...] | None:
        """The KV side of a move as ``word`` elements: rows, the fused view, or the planes."""
        if word not in self._cache:
            fused = self._fused
            if self.mode == "plane-major rows":  # [P*B, block]; view() (never a copy) or fail
                views = (self._cut(_word_view(fused.view(fused.shape[0] * fused.shape[1], -1), word)),)
            elif self.mode == "block-major rows":  # [B, P*block]
                views = (self._cut(_word_view(fused.transpose(0, 1).view(fused.shape[1], -1), word)),)
            elif self.mode == "strided rows":  # [runs, run] from the fused view's first byte
                rows = sum((size - 1) * stride for size, stride in zip(fused.shape, self._run_row_strides)) + 1
                views = (self._cut(_word_view(torch.as_strided(fused, (rows, self._run), (self._run, 1)), word)),)
            elif self.mode == "strided":
                views = (_word_view(self._fused, word),)
            else:
                views = tuple(_word_view(p, word) for p in self._planes)
            self._cache[word] = None if any(v is None for v in views) else views
        return self._cache[word]

    def _moves(self, block_ids: torch.Tensor, host: torch.Tensor):
        """``(device view, dim, index, host view)`` for each batched op of a move."""
        n = block_ids.numel()
        if not host.is_contiguous():
            raise ValueError("host buffer must be contiguous")  # a reshape would copy, and lose the data
        flat = (host if host.element_size() == 1 else host.view(torch.int8)).view(-1)
        if flat.numel() != n * self.block_bytes:
            raise ValueError(f"host buffer holds {flat.numel()} bytes, {n} blocks need {n * self.block_bytes}")
        for word in self._word_dtypes:
            views, host_words = self._device_views(word), _word_view(flat, word)
            if views is not None and host_words is not None:
                break
        if self.mode == "plane-major rows":
            (rows,) = views
            yield self._row_move(rows, (self._plane_rows + block_ids[None, :]).flatten(), host_words)
        elif self.mode == "block-major rows":
            (rows,) = views
            yield self._row_move(rows, block_ids, host_words)
        elif self.mode == "strided rows":
            (rows,) = views
            ids = block_ids.view(1, n, *[1] * (self._run_base.dim() - 2))
            yield self._row_move(rows, (self._run_base + ids * self._run_row_strides[1]).flatten(), host_words)
        elif self.mode == "strided":
            (fused,) = views
            yield fused, 1, block_ids, host_words.view(fused.shape[0], n, *fused.shape[2:])
        else:
            offset = 0
            for plane in views:
                size = n * plane[0].numel()
                yield plane, 0, block_ids, host_words[offset : offset + size].view(n, *plane.shape[1:])
                offset += size

    def _cut(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The row table with each row cut into the fewest equal pieces of at most ``max_row_words``.

        Piece j of row i is row ``i*k + j`` of the cut table, in host order too; ``k`` is
        kept per word type (:meth:`_row_move`), so moves only widen their index.
        """
        limit, width = self._max_row_words, None if rows is None else rows.shape[1]
        if rows is None or limit is None or width <= limit:
            return rows
        k = -(-width // limit)
        while width % k:
            k += 1
        self._piece_offsets[rows.dtype] = torch.arange(k, device=rows.device)
        return rows.view(-1, width // k)

    def _row_move(self, rows: torch.Tensor, index: torch.Tensor, host_words: torch.Tensor):
        """One index op over whole rows (or their pieces, see :meth:`_cut`)."""
        offsets = self._piece_offsets.get(rows.dtype)
        if offsets is not None:
            index = (index[:, None] * offsets.numel() + offsets).flatten()
        return rows, 0, index, host_words.view(index.numel(), -1)
