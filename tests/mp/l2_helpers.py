# SPDX-License-Identifier: Apache-2.0
"""Drive an L2 adapter as LMCache's MP server controllers do: real ``ObjectKey``, ``TensorMemoryObj``,
``Bitmap`` and event fds (runs in the test process)."""

import os
import select

import torch
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj


def memory_obj(shape, dtype=torch.bfloat16, fill=None) -> TensorMemoryObj:
    data = torch.empty(shape, dtype=dtype)
    if fill is not None:
        data.copy_(fill.view(shape))
    meta = MemoryObjMetadata(shape=torch.Size(shape), dtype=dtype, address=0,
                             phy_size=data.numel() * data.element_size(), ref_count=1, fmt=MemoryFormat.KV_2LTD)
    return TensorMemoryObj(raw_data=data.view(torch.uint8).view(-1), metadata=meta, parent_allocator=None)


def keys(n, model="org/model", rank=0):
    return [ObjectKey(chunk_hash=bytes([i]) * 32, model_name=model, kv_rank=rank) for i in range(n)]


def wait(adapter, fd, poll):
    """Block on the task kind's event fd (as LMCache's controllers do), then take the result."""
    for _ in range(100):
        result = poll()
        if result is not None:
            return result
        select.select([fd], [], [], 0.1)
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
    raise AssertionError("task never completed")


def store(adapter, ks, objs):
    task = adapter.submit_store_task(ks, objs)
    done = wait(adapter, adapter.get_store_event_fd(), lambda: adapter.pop_completed_store_tasks().get(task))
    return done


def lookup(adapter, ks):
    task = adapter.submit_lookup_and_lock_task(ks, {})
    found = wait(adapter, adapter.get_lookup_and_lock_event_fd(), lambda: adapter.query_lookup_and_lock_result(task))
    return [found.test(i) for i in range(len(ks))]


def load(adapter, ks, objs):
    task = adapter.submit_load_task(ks, objs)
    got = wait(adapter, adapter.get_load_event_fd(), lambda: adapter.query_load_result(task))
    return [got.test(i) for i in range(len(ks))]
