# SPDX-License-Identifier: Apache-2.0
"""Huge pages under host KV tensors: contents kept, pages really collapsed, failures only logged."""

import ctypes
import mmap

import pytest
import torch

from vllm_kvplugin.bench.layouts import vllm_style_views
from vllm_kvplugin.devices import device_ops
from vllm_kvplugin.kv.huge_pages import HUGE_PAGE, back_with_huge_pages, collapse, storage_ranges


def anon_huge_kib(address: int, nbytes: int) -> int:
    """AnonHugePages (KiB) of the mappings of this process that overlap ``[address, address + nbytes)``."""
    total, overlaps = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                overlaps = lo < address + nbytes and address < hi
            elif overlaps and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


def test_views_of_one_buffer_are_one_range():
    buffer = torch.zeros(2 * 8 * 2 * 16 * 4, dtype=torch.int8)
    views = vllm_style_views(buffer, "LHBNC", L=2, B=8, H=2, N=16, C=4)
    assert storage_ranges(views) == [(buffer.data_ptr(), buffer.nbytes)]
    other = torch.zeros(10)
    assert len(storage_ranges([*views, other, other[2:]])) == 2


def test_collapse_keeps_contents_and_backs_the_buffer_with_huge_pages():
    buffer = torch.randint(-128, 128, (9 * HUGE_PAGE + 12345,), dtype=torch.int8)
    before = buffer.clone()
    try:
        done = collapse(buffer.data_ptr(), buffer.nbytes)
    except OSError as e:  # kernels before 6.1, THP compiled out: the product then logs and moves on
        pytest.skip(f"no MADV_COLLAPSE here: {e}")
    assert done >= 8 * HUGE_PAGE and done % HUGE_PAGE == 0
    assert anon_huge_kib(buffer.data_ptr(), buffer.nbytes) * 1024 >= done
    assert torch.equal(buffer, before)


def test_a_range_without_a_whole_huge_page_is_left_alone():
    small = torch.ones(1000, dtype=torch.int8)
    assert collapse(small.data_ptr(), small.nbytes) == 0


def test_refusals_are_errors_for_collapse_and_a_log_line_for_the_worker(tmp_path):
    mapping = mmap.mmap(-1, 4 * HUGE_PAGE)
    view = (ctypes.c_char * len(mapping)).from_buffer(mapping)
    address = ctypes.addressof(view)
    del view
    mapping.close()  # the range is unmapped now
    with pytest.raises(OSError):
        collapse(address, 4 * HUGE_PAGE)

    path = tmp_path / "kv.bin"  # a shared file mapping: the kernel refuses to collapse it
    path.write_bytes(b"\x07" * (4 * HUGE_PAGE))
    file_backed = torch.from_file(str(path), shared=True, size=4 * HUGE_PAGE, dtype=torch.int8)
    messages = []
    assert back_with_huge_pages([file_backed], messages.append) == 0
    assert len(messages) == 1 and "small pages" in messages[0], messages
    assert bool((file_backed == 7).all())


def test_cpu_device_ops_prepare_kv_memory_collapses_before_returning():
    messages = []
    buffer = torch.ones(4 * HUGE_PAGE, dtype=torch.int8)
    device_ops("cpu").prepare_kv_memory([buffer], messages.append)
    assert len(messages) == 1 and ("huge pages" in messages[0] or "small pages" in messages[0]), messages
    assert torch.equal(buffer, torch.ones_like(buffer))
