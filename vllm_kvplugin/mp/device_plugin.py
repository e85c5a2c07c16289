# SPDX-License-Identifier: Apache-2.0
"""Our KV mover as an LMCache device plugin: paged KV ⇄ LMCache MP chunks in one pass per layer.

Runs in the vLLM worker process in LMCache's multiprocess mode, where the
worker itself gathers paged KV into the server's chunk objects (store) and
scatters them back (load): LMCache's ``engine_driven`` transfer calls
``DeviceOps.multi_layer_block_kv_transfer`` once per store or load with every
chunk of the request. Registered through the ``lmcache.device_plugins``
entry point of this distribution (``kvplugin_cpu``).

The chunk bytes are exactly LMCache's own (tests compare them with LMCache's
torch path byte for byte): a server, its L2 files and every worker agree
whichever side moved the KV. What differs is the number of passes over the
data. For a store LMCache's torch path selects a layer's blocks into a
temporary, permutes them into a second one and copies that into the chunk;
here ``index_select`` reads the blocks through a token-major view of the
layer and writes straight into the chunk: one pass, over 16-byte words
rather than 2-byte elements. Loads are one ``index_copy_`` per layer on both
paths, ours again over words. Layouts handled (everything else
goes to LMCache's own implementation, unchanged):

* ``NL_X_NB_NH_BS_CS`` / ``NL_X_NB_BS_NH_CS``: one tensor per layer with K
  and V packed in the last dimension (vLLM-CPU's ``[NB, NH, BS, 2·HS]``),
  chunk ``[NL, tokens, NH·CS]``;
* ``NL_X_TWO_X_NB_BS_NH_HS``: a ``(K, V)`` pair per layer (vllm-gaudi),
  chunk ``[2, NL, tokens, NH·HS]``.

Which processes use it: LMCache detects one device per process when it is
imported, and a CPU spec that called itself available would be taken for the
device of every process, the ``lmcache server`` and in-process LMCache
included. So this spec claims CPU tensors only after
:func:`claim_cpu_transfers` (called by the portable MP connector in its
worker, before it registers the KV caches); until then LMCache's built-in
CPU spec serves, as without the plugin.
"""

from __future__ import annotations

import logging

import torch
from lmcache.lmcache_native import EngineKVFormat, TransferDirection
from lmcache.v1.platform.devices.cpu import CpuDeviceSpec
from lmcache.v1.platform.devices.cpu.device_ops import CpuDeviceOps

BACKEND_NAME = "kvplugin_cpu"

# LMCache's format numbers (its enum is a native one: compare as ints).
_PACKED = {int(EngineKVFormat.NL_X_NB_NH_BS_CS): True, int(EngineKVFormat.NL_X_NB_BS_NH_CS): False}  # heads first?
_KV_PAIRS = int(EngineKVFormat.NL_X_TWO_X_NB_BS_NH_HS)

_claimed = False


def claim_cpu_transfers() -> None:
    """From now on, this process's LMCache MP transfers of CPU KV go through this plugin.

    LMCache then picks this backend among the CPU ones on every transfer (each store and load of a
    request) and logs that choice at INFO each time; the line is let through once per process.
    (``LMCACHE_DEVICE_BACKEND`` would silence the choice but also rules LMCache's device detection at
    import, where it would fail in any child process that imports LMCache before claiming.)
    """
    global _claimed
    if not _claimed:
        logging.getLogger("lmcache.v1.platform").addFilter(_ChoiceLoggedOnce())
    _claimed = True


class _ChoiceLoggedOnce(logging.Filter):
    """Drops LMCache's repeated "Auto-selected backend [kvplugin_cpu]" INFO line after its first time."""

    def __init__(self):
        super().__init__()
        self._logged = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Auto-selected backend") or BACKEND_NAME not in record.getMessage():
            return True
        first, self._logged = not self._logged, True
        return first


def handles(paged, objects, engine_kv_format) -> bool:
    """Whether :func:`transfer` moves this call (tensors on the CPU, a layout it knows)."""
    if not isinstance(paged, (list, tuple)) or not paged or not objects or not all(
            isinstance(o, torch.Tensor) and o.device.type == "cpu" and o.is_contiguous() for o in objects):
        return False
    fmt = int(engine_kv_format)
    if fmt in _PACKED:
        return all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() in (4, 5) for t in paged)
    if fmt == _KV_PAIRS:
        return all(isinstance(p, (list, tuple)) and len(p) == 2 and all(
            isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() == 4 for t in p) for p in paged)
    return False


def _block_views(paged, engine_kv_format) -> list[list[torch.Tensor]]:
    """Per layer, its planes as token-major ``[NB, BS, NH, W]`` views (no copy)."""
    fmt = int(engine_kv_format)
    if fmt == _KV_PAIRS:
        return [list(pair) for pair in paged]
    views = []
    for layer in paged:
        layer = layer.reshape(*layer.shape[:3], -1) if layer.dim() == 5 else layer  # [NB, ·, ·, 2·HS]
        views.append([layer.permute(0, 2, 1, 3) if _PACKED[fmt] else layer])
    return views


_WORDS = ((16, torch.complex128), (8, torch.int64), (4, torch.int32), (2, torch.int16))


def _word_dtype(run_bytes: int, tensors) -> torch.dtype:
    """The widest word that tiles every contiguous run: CPU copies of 16-byte words run near ``memcpy``
    speed where 2-byte elements do not (a bf16 head row copies 1.4-1.6x faster as 16-byte words here)."""
    for size, dtype in _WORDS:
        if run_bytes % size == 0 and all(t.data_ptr() % size == 0 for t in tensors):
            return dtype
    return torch.uint8


def transfer(paged, objects, block_ids, direction, block_size: int, chunk_tokens: int, engine_kv_format,
             skip_prefix_n_blocks: int) -> None:
    """Move whole blocks between the paged layers and the chunk objects (LMCache's semantics).

    Object ``i`` holds flat block positions ``[i·bpo, (i+1)·bpo)`` of
    ``block_ids`` (``bpo = chunk_tokens // block_size``); positions below
    ``skip_prefix_n_blocks`` are left alone (the engine already has them).
    """
    layers = _block_views(paged, engine_kv_format)
    word = _word_dtype(layers[0][0].shape[-1] * layers[0][0].element_size(),
                       [t for planes in layers for t in planes] + list(objects))
    layers = [[t.view(word) for t in planes] for planes in layers]
    objects = [o.view(word) for o in objects]
    planes, nl = len(layers[0]), len(layers)
    _, bs, nh, width = layers[0][0].shape
    ids = torch.as_tensor(block_ids, dtype=torch.long)
    store = int(direction) == int(TransferDirection.D2H)
    per_object = chunk_tokens // block_size
    for i, obj in enumerate(objects):
        first = max(i * per_object, skip_prefix_n_blocks)
        last = min((i + 1) * per_object, ids.numel())
        if first >= last:
            continue
        tokens = obj.numel() // (planes * nl * nh * width)
        chunk = obj.view(planes, nl, tokens, nh * width)
        start = (first - i * per_object) * block_size
        rows = ids[first:last]
        for layer, layer_planes in enumerate(layers):
            for plane, blocks in enumerate(layer_planes):
                part = chunk[plane, layer, start : start + (last - first) * bs].view(last - first, bs, nh, width)
                if store:
                    torch.index_select(blocks, 0, rows, out=part)
                else:
                    blocks.index_copy_(0, rows, part)


class PortableCpuOps(CpuDeviceOps):
    """LMCache's CPU device ops with the one-pass block transfer."""

    def multi_layer_block_kv_transfer(
        self,
        paged_buffer_ptrs_tensor,
        lmcache_objects_ptrs: "list[torch.Tensor] | list[int]",  # "Tensor" here: LMCache passes tensors
        block_ids,
        device,
        direction,
        shape_desc,
        lmcache_chunk_size: int,
        engine_kv_format,
        skip_prefix_n_blocks: int,
    ) -> None:
        if not handles(paged_buffer_ptrs_tensor, lmcache_objects_ptrs, engine_kv_format):
            return super().multi_layer_block_kv_transfer(
                paged_buffer_ptrs_tensor, lmcache_objects_ptrs, block_ids, device, direction, shape_desc,
                lmcache_chunk_size, engine_kv_format, skip_prefix_n_blocks)
        transfer(paged_buffer_ptrs_tensor, lmcache_objects_ptrs, block_ids, direction, int(shape_desc.bs),
                 lmcache_chunk_size, engine_kv_format, skip_prefix_n_blocks)


class PortableCpuSpec(CpuDeviceSpec):
    """LMCache's CPU spec (shared memory, transfer modes) with :class:`PortableCpuOps`, once claimed."""

    @property
    def backend_name(self) -> str:
        return BACKEND_NAME

    @property
    def ops_cls(self):
        return PortableCpuOps

    def is_available(self) -> bool:
        return _claimed
