# SPDX-License-Identifier: Apache-2.0
"""Back host-memory KV tensors with transparent huge pages (Linux ``MADV_COLLAPSE``), best effort.

Runs in the vLLM worker process, once, when vLLM registers its KV caches, before
the engine serves (:meth:`vllm_kvplugin.devices.cpu.CpuOps.prepare_kv_memory`), if
``kvplugin.huge_pages`` is true: about 0.3 s per GiB of KV cache, and 15 s per GiB
measured on this kind of VM, whose host backs guest memory on first touch; hence opt-in.

Why: a move gathers a chunk's blocks from all over the KV cache. With 4 KiB
pages, every run of a small or head-strided block starts on a page the TLB has
not seen, and the TLB, not memory bandwidth, bounds the copy: 8 KiB runs read
at 88% of a contiguous ``copy_`` on 4 KiB pages and 100% on 2 MiB pages here
(``bench mover``). vLLM-CPU allocates the cache with ``torch.zeros``, whose
pages are all touched by the zero fill, on 4 KiB pages (torch asks for huge
pages only under ``THP_MEM_ALLOC_ENABLE=1`` set before the process started).
``MADV_COLLAPSE`` (Linux >= 6.1) rebuilds pages that are already there as huge
ones, in place and keeping their contents, whatever the system's THP setting;
vLLM does the same for its own CPU-resident tables. ``MADV_HUGEPAGE`` is asked
too, so pages the kernel later splits are merged back by khugepaged.

Nothing depends on it succeeding: without huge pages moves are as exact, only
slower on strided layouts.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterable

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25


def storage_ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The distinct ``(address, bytes)`` of the storages behind ``tensors`` (views of one buffer count once)."""
    ranges = {}
    for t in tensors:
        storage = t.untyped_storage()
        ranges[storage.data_ptr()] = max(ranges.get(storage.data_ptr(), 0), storage.nbytes())
    return sorted(ranges.items())


def collapse(address: int, nbytes: int) -> int:
    """Ask for huge pages over the whole 2 MiB pages inside ``[address, address + nbytes)``.

    Returns the bytes collapsed (0 if the range holds no whole huge page).

    Raises:
        OSError: the kernel refused (no THP support, ``MADV_COLLAPSE`` unknown
            before Linux 6.1, no free huge pages).
    """
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    length = (address + nbytes) // HUGE_PAGE * HUGE_PAGE - start
    if length <= 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for advice in (MADV_HUGEPAGE, MADV_COLLAPSE):
        if libc.madvise(start, length, advice) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"madvise({advice}): {os.strerror(errno)}")
    return length


def back_with_huge_pages(tensors: Iterable[torch.Tensor], log) -> int:
    """Collapse the storages of ``tensors``; ``log(message)`` says how it went. Returns the bytes collapsed.

    Synchronous, before the engine serves: a collapse running beside requests held up
    their memory mappings (tier reads 10-40x slower for the seconds it ran).
    """
    done, began = 0, time.perf_counter()
    try:
        for address, nbytes in storage_ranges(tensors):
            done += collapse(address, nbytes)
    except OSError as e:
        log(f"KV cache stays on small pages ({e.strerror}; {done >> 20} MiB collapsed): moves of small "
            "or strided blocks run slower")
        return done
    if done:
        log(f"KV cache on huge pages: {done >> 20} MiB collapsed in {time.perf_counter() - began:.1f} s")
    return done
