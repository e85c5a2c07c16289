# SPDX-License-Identifier: Apache-2.0
"""A vLLM worker extension for leak checks (``--worker-extension-cls``; called via ``/collective_rpc``).

Runs inside each vLLM worker process. It only reads: how many bytes of
LMCache's host buffer pool are allocated and how many direct-I/O chunk files
are pinned, and (async saves) how many requests the background saver still
tracks. With LMCache's CPU tier off, all must be back to zero once no request
is in flight — anything else is a leaked buffer, pin or kept block.
"""


class KVPluginProbe:
    def kvplugin_buffers(self) -> dict:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
        engine = connector._portable_engine
        manager = engine.storage_manager
        allocator = manager.local_cpu_backend.memory_allocator.pin_allocator
        pins = 0
        for backend in manager.storage_backends.values():
            directory = getattr(backend, "directory", None)
            pins += sum(n for n in getattr(directory, "_pinned", {}).values() if n > 0)
        saver = connector._saver  # kvplugin.save_mode=async only
        return {"host_pool_allocated_bytes": allocator.total_allocated_size, "pinned_chunk_files": pins,
                "unsettled_async_saves": None if saver is None else saver.unsettled()}
