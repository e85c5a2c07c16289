# SPDX-License-Identifier: Apache-2.0
"""A vLLM worker extension for leak checks (``--worker-extension-cls``; called via ``/collective_rpc``).

Runs inside each vLLM worker process. It only reads: how many bytes of
LMCache's host buffer pool are allocated and how many direct-I/O chunk files
are pinned. With LMCache's CPU tier off, both must be back to zero once no
request is in flight — anything else is a leaked buffer or pin.
"""


class KVPluginProbe:
    def kvplugin_buffers(self) -> dict:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        engine = get_kv_transfer_group()._portable_engine
        manager = engine.storage_manager
        allocator = manager.local_cpu_backend.memory_allocator.pin_allocator
        pins = 0
        for backend in manager.storage_backends.values():
            directory = getattr(backend, "directory", None)
            pins += sum(n for n in getattr(directory, "_pinned", {}).values() if n > 0)
        return {"host_pool_allocated_bytes": allocator.total_allocated_size, "pinned_chunk_files": pins}
